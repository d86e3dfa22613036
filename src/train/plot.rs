//! Loss-curve charts for training runs, written as SVG files.
//!
//! [`render_svg`] draws one or more [`Series`] (for example training loss per step and
//! validation loss every few hundred steps) on a single chart with the `plotters` crate: white
//! background, a framed plot area with light grey grid lines at round tick values, tick labels,
//! a title, axis labels and a legend in the top-right corner of the plot area.
//!
//! The picture is SVG, so text stays text and no font stack is built or loaded: `plotters` is
//! used with its SVG backend only (no bitmap backend, no TrueType). Output is deterministic: the
//! same input always gives the same bytes.

use std::ops::Range;
use std::path::Path;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line on the chart: (x, y) points in drawing order, e.g. (step, loss).
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// RGB colour.
    pub color: [u8; 3],
    /// Draw each point as a small marker (for sparse series such as validation loss) instead of a line.
    pub markers: bool,
}

/// Why a chart could not be produced or written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("drawing SVG: {0}")]
    Draw(String),
}

/// Size used by [`write_svg`].
const DEFAULT_SIZE: (u32, u32) = (800, 500);
/// Smallest chart drawn; smaller requests are enlarged to this.
const MIN_SIZE: (u32, u32) = (200, 150);
/// Largest side drawn; larger requests are shrunk to this.
const MAX_SIDE: u32 = 4096;

/// A coordinate magnitude beyond which points are skipped: the axis span must stay finite.
const MAX_COORD: f64 = 1e300;
/// Fraction of the y data span added above and below the data.
const Y_PAD: f64 = 0.05;

const TEXT: RGBColor = RGBColor(25, 25, 25);
const FRAME: RGBColor = RGBColor(60, 60, 60);
const GRID: RGBColor = RGBColor(225, 225, 225);
const LEGEND_BORDER: RGBColor = RGBColor(170, 170, 170);

/// Renders the series on one chart of `width`×`height` pixels and returns the SVG document.
///
/// The size is clamped to at least 200×150 and at most 4096 on each side. Points with a
/// non-finite (or astronomically large) coordinate are skipped; in a line series they leave a
/// gap. Series with an empty label get no legend entry.
pub fn render_svg(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> Result<String, PlotError> {
    let mut svg = String::new();
    draw_chart(&mut svg, title, x_label, y_label, series, width, height)?;
    Ok(svg)
}

/// `render_svg` at 800×500, written to `path` atomically (through `fsio::write_atomic`).
pub fn write_svg(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let (width, height) = DEFAULT_SIZE;
    let svg = render_svg(title, x_label, y_label, series, width, height)?;
    crate::fsio::write_atomic(path, svg.as_bytes()).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The pixel columns and rows of the plot area, as drawn (for the tests).
type PlotArea = (Range<i32>, Range<i32>);

/// Draws the whole chart into `svg` and returns where the plot area went.
fn draw_chart(
    svg: &mut String,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> Result<PlotArea, PlotError> {
    let size = (
        width.clamp(MIN_SIZE.0, MAX_SIDE),
        height.clamp(MIN_SIZE.1, MAX_SIDE),
    );
    let root = SVGBackend::with_string(svg, size).into_drawing_area();
    let area = draw_on(&root, title, x_label, y_label, series, size).map_err(draw_error)?;
    root.present().map_err(draw_error)?;
    Ok(area)
}

fn draw_error(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

type DrawResult<T> = Result<T, DrawingAreaErrorKind<std::io::Error>>;

/// The chart itself: grid, ticks and axis labels, the series, the frame, the legend and the title.
fn draw_on(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    (width, height): (u32, u32),
) -> DrawResult<PlotArea> {
    // Text and margins grow with the picture: 1× up to 640×400, at most 4×.
    let s = (width / 640).min(height / 400).clamp(1, 4);
    let font = |size: u32| ("sans-serif", size * s).into_font().color(&TEXT);

    root.fill(&WHITE)?;
    let usable = |(x, y): (f64, f64)| usable_coord(x) && usable_coord(y);
    let points = || {
        series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(move |&p| usable(p))
    };
    let x_range = data_range(points().map(|p| p.0), 0.0);
    let y_range = data_range(points().map(|p| p.1), Y_PAD);

    let mut chart = ChartBuilder::on(root)
        .caption(title, font(20))
        .margin(10 * s)
        .margin_right(25 * s)
        .x_label_area_size(if x_label.is_empty() { 25 } else { 45 } * s)
        .y_label_area_size(if y_label.is_empty() { 50 } else { 70 } * s)
        .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;

    let mut mesh = chart.configure_mesh();
    mesh.bold_line_style(GRID)
        .max_light_lines(0)
        .axis_style(FRAME)
        .x_label_formatter(&x_tick)
        .label_style(font(12))
        .axis_desc_style(font(13));
    if !x_label.is_empty() {
        mesh.x_desc(x_label);
    }
    if !y_label.is_empty() {
        mesh.y_desc(y_label);
    }
    mesh.draw()?;

    for entry in series {
        let color = RGBColor(entry.color[0], entry.color[1], entry.color[2]);
        // A filled square of side 2 × `half` + 1 pixels centred on a data point.
        let square = |at: (f64, f64), half: i32| {
            EmptyElement::at(at)
                + Rectangle::new([(-half, -half), (half + 1, half + 1)], color.filled())
        };
        if entry.markers {
            chart.draw_series(
                entry
                    .points
                    .iter()
                    .copied()
                    .filter(|&p| usable(p))
                    .map(|p| square(p, 2)),
            )?;
        } else {
            let runs = runs(&entry.points, usable);
            let style = color.stroke_width(2);
            chart.draw_series(
                runs.iter()
                    .filter(|run| run.len() > 1)
                    .map(|run| PathElement::new(run.clone(), style)),
            )?;
            // A run of one point has no segment: show it as a 3×3 dot.
            chart.draw_series(
                runs.iter()
                    .filter(|run| run.len() == 1)
                    .map(|run| square(run[0], 1)),
            )?;
        }
        // The legend entry, once per series (a line may be drawn as several runs), even for a
        // series with nothing to draw.
        if !entry.label.is_empty() {
            let markers = entry.markers;
            chart
                .draw_series(std::iter::empty::<PathElement<(f64, f64)>>())?
                .label(entry.label.as_str())
                .legend(move |(x, y)| {
                    if markers {
                        EmptyElement::at((x + 8 * s as i32, y))
                            + Rectangle::new([(-2, -2), (3, 3)], color.filled())
                    } else {
                        EmptyElement::at((x, y))
                            + Rectangle::new([(0, -1), (16 * s as i32, 1)], color.filled())
                    }
                });
        }
    }

    chart.plotting_area().draw(&Rectangle::new(
        [(x_range.0, y_range.0), (x_range.1, y_range.1)],
        FRAME,
    ))?;
    if series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .margin(8 * s)
            .legend_area_size(24 * s)
            .label_font(font(12))
            .background_style(WHITE.filled())
            .border_style(LEGEND_BORDER)
            .draw()?;
    }
    Ok(chart.plotting_area().get_pixel_range())
}

/// A tick label of the x axis: a whole number (a step) without plotters' trailing ".0".
fn x_tick(v: &f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        RangedCoordf64::format(v)
    }
}

fn usable_coord(v: f64) -> bool {
    v.is_finite() && v.abs() < MAX_COORD
}

/// Splits a line into its runs of consecutive usable points: an unusable point leaves a gap.
fn runs(points: &[(f64, f64)], usable: impl Fn((f64, f64)) -> bool) -> Vec<Vec<(f64, f64)>> {
    points
        .split(|&p| !usable(p))
        .filter(|run| !run.is_empty())
        .map(<[_]>::to_vec)
        .collect()
}

/// The range covered by `values`, widened by `pad` × span on both sides.
///
/// No values gives 0..1; a degenerate range (one distinct value) is widened to ±10 % of the
/// value, or ±1 when the value is (close to) zero, so that every chart has a usable axis.
fn data_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    if span <= lo.abs().max(hi.abs()) * 1e-12 || span < 1e-200 {
        let mid = lo / 2.0 + hi / 2.0;
        let half = if mid.abs() * 0.1 >= 1e-200 {
            mid.abs() * 0.1
        } else {
            1.0
        };
        return (mid - half, mid + half);
    }
    (lo - span * pad, hi + span * pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RED: [u8; 3] = [220, 30, 40];
    const BLUE: [u8; 3] = [30, 90, 200];
    /// `RED` and `BLUE` as the SVG writes them.
    const RED_HEX: &str = "#DC1E28";
    const BLUE_HEX: &str = "#1E5AC8";

    fn series(label: &str, points: Vec<(f64, f64)>, color: [u8; 3], markers: bool) -> Series {
        Series {
            label: label.to_string(),
            points,
            color,
            markers,
        }
    }

    /// One element of the document: its name and attributes (text content is not kept).
    #[derive(Debug)]
    struct Element {
        name: String,
        attrs: Vec<(String, String)>,
    }

    impl Element {
        fn attr(&self, name: &str) -> Option<&str> {
            self.attrs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }

        fn num(&self, name: &str) -> f64 {
            let v = self
                .attr(name)
                .unwrap_or_else(|| panic!("{name} in {self:?}"));
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v} in {self:?}"))
        }

        /// The (x, y) pairs of a polyline's `points`.
        fn points(&self) -> Vec<(f64, f64)> {
            let text = self.attr("points").expect("points");
            text.split_whitespace()
                .map(|pair| {
                    let (x, y) = pair.split_once(',').expect("x,y");
                    (x.parse().expect("x"), y.parse().expect("y"))
                })
                .collect()
        }
    }

    /// A parsed SVG document: the elements in document order and the text of each `<text>`.
    struct Doc {
        elements: Vec<Element>,
        texts: Vec<String>,
    }

    impl Doc {
        fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
            self.elements.iter().filter(move |e| e.name == name)
        }

        fn with_color<'a>(&'a self, name: &'a str, hex: &'a str) -> Vec<&'a Element> {
            self.all(name)
                .filter(|e| e.attr("stroke") == Some(hex) || e.attr("fill") == Some(hex))
                .collect()
        }

        fn has_text(&self, text: &str) -> bool {
            self.texts.iter().any(|t| t == text)
        }
    }

    /// Decodes the five predefined XML entities; anything else after `&` is an error.
    fn unescape(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('&') {
            out.push_str(&rest[..i]);
            let end = rest[i..].find(';').expect("entity ends with ;") + i;
            out.push(match &rest[i + 1..end] {
                "lt" => '<',
                "gt" => '>',
                "amp" => '&',
                "quot" => '"',
                "apos" => '\'',
                other => panic!("unknown entity &{other};"),
            });
            rest = &rest[end + 1..];
        }
        assert!(!rest.contains(['<', '>']), "unescaped markup in {text:?}");
        out.push_str(rest);
        out
    }

    /// Parses `svg` as XML (a small checker: elements, attributes, entities and text; no
    /// comments, CDATA or doctype, which the writer never emits). Panics where the document is
    /// not well formed: unbalanced tags, unquoted or repeated attributes, stray `<`, `>` or `&`.
    fn parse(svg: &str) -> Doc {
        let mut doc = Doc {
            elements: Vec::new(),
            texts: Vec::new(),
        };
        let mut open: Vec<String> = Vec::new();
        let mut text = String::new();
        let mut rest = svg;
        if let Some(after) = rest.strip_prefix("<?xml") {
            rest = &after[after.find("?>").expect("end of the XML declaration") + 2..];
        }
        let mut roots = 0;
        while let Some(lt) = rest.find('<') {
            text.push_str(&unescape(&rest[..lt]));
            let gt = rest[lt..].find('>').expect("tag ends") + lt;
            let tag = &rest[lt + 1..gt];
            rest = &rest[gt + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop().as_deref(), Some(name.trim()), "closing tag");
                if name.trim() == "text" {
                    doc.texts.push(std::mem::take(&mut text).trim().to_string());
                }
                continue;
            }
            if open.is_empty() {
                roots += 1;
            }
            let (tag, self_closing) = match tag.strip_suffix('/') {
                Some(t) => (t, true),
                None => (tag, false),
            };
            let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
            let name = &tag[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                "element name {name:?}"
            );
            let mut attrs: Vec<(String, String)> = Vec::new();
            let mut a = tag[name_end..].trim_start();
            while !a.is_empty() {
                let eq = a
                    .find("=\"")
                    .unwrap_or_else(|| panic!("attribute in {tag:?}"));
                let key = a[..eq].trim();
                assert!(
                    key.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_:".contains(c)),
                    "attribute name {key:?}"
                );
                let close = a[eq + 2..].find('"').expect("attribute value ends") + eq + 2;
                assert!(attrs.iter().all(|(k, _)| k != key), "repeated {key}");
                attrs.push((key.to_string(), unescape(&a[eq + 2..close])));
                a = a[close + 1..].trim_start();
            }
            if name == "text" {
                text.clear();
            }
            doc.elements.push(Element {
                name: name.to_string(),
                attrs,
            });
            if !self_closing {
                open.push(name.to_string());
            }
        }
        assert!(open.is_empty(), "unclosed {open:?}");
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert_eq!(roots, 1, "one root element");
        doc
    }

    /// Centre of a marker square.
    fn centre(e: &Element) -> (f64, f64) {
        (
            e.num("x") + e.num("width") / 2.0,
            e.num("y") + e.num("height") / 2.0,
        )
    }

    #[test]
    fn output_is_an_svg_of_the_requested_size() {
        let s = series("train", vec![(0.0, 3.0), (10.0, 1.0)], RED, false);
        let svg = render_svg("t", "step", "loss", &[s], 640, 480).expect("render");
        let doc = parse(&svg);
        let root = &doc.elements[0];
        assert_eq!(root.name, "svg");
        assert_eq!(root.attr("xmlns"), Some("http://www.w3.org/2000/svg"));
        assert_eq!((root.num("width"), root.num("height")), (640.0, 480.0));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn the_svg_is_well_formed_and_has_every_series_and_label() {
        let train: Vec<(f64, f64)> = (0..=300)
            .map(|i| (i as f64, 3.0 / (1.0 + i as f64 / 50.0)))
            .collect();
        let val = vec![(100.0, 1.4), (200.0, 1.1), (300.0, 0.9)];
        let svg = render_svg(
            "kaiwa <train> & \"eval\"",
            "step",
            "loss (nats/token)",
            &[
                series("training loss", train, RED, false),
                series("validation loss", val, BLUE, true),
            ],
            800,
            500,
        )
        .expect("render");
        let doc = parse(&svg);
        // The training loss is one polyline in its colour, the validation loss three markers
        // (plus one swatch each in the legend).
        let lines = doc.with_color("polyline", RED_HEX);
        assert_eq!(lines.len(), 1, "{svg}");
        assert_eq!(lines[0].points().len(), 301);
        assert_eq!(lines[0].attr("stroke-width"), Some("2"));
        assert_eq!(doc.with_color("rect", BLUE_HEX).len(), 3 + 1);
        assert_eq!(doc.with_color("rect", RED_HEX).len(), 1, "legend swatch");
        // Title (escaped and read back), axis labels, legend labels and tick labels are text.
        for text in [
            "kaiwa <train> & \"eval\"",
            "step",
            "loss (nats/token)",
            "training loss",
            "validation loss",
        ] {
            assert!(doc.has_text(text), "{text:?} in {:?}", doc.texts);
        }
        let numbers = doc
            .texts
            .iter()
            .filter(|t| t.parse::<f64>().is_ok())
            .count();
        assert!(numbers >= 6, "tick labels: {:?}", doc.texts);
        // Light grey grid lines.
        assert!(doc.with_color("line", "#E1E1E1").len() >= 6);
    }

    #[test]
    fn a_line_series_is_drawn_in_its_colour() {
        let points: Vec<(f64, f64)> = (0..=100).map(|i| (i as f64, 2.0 * i as f64)).collect();
        let svg = render_svg(
            "title",
            "step",
            "loss",
            &[series("", points, RED, false)],
            800,
            500,
        )
        .expect("render");
        let doc = parse(&svg);
        let lines = doc.with_color("polyline", RED_HEX);
        assert_eq!(lines.len(), 1);
        // A straight line stays straight: the middle point is halfway between the ends.
        let p = lines[0].points();
        let (a, m, b) = (p[0], p[50], p[100]);
        assert!((m.0 - (a.0 + b.0) / 2.0).abs() <= 1.0 && (m.1 - (a.1 + b.1) / 2.0).abs() <= 1.0);
        assert!(b.0 > a.0 && b.1 < a.1, "up and to the right: {a:?} {b:?}");

        let empty = render_svg("title", "step", "loss", &[], 800, 500).expect("render");
        assert!(!empty.contains(RED_HEX));
    }

    #[test]
    fn markers_are_5x5_squares_in_the_series_colour() {
        let points = vec![(0.0, 0.0), (5.0, 5.0), (10.0, 10.0)];
        let mut svg = String::new();
        let (xs, ys) = draw_chart(
            &mut svg,
            "",
            "",
            "",
            &[series("", points, BLUE, true)],
            800,
            500,
        )
        .expect("draw");
        let doc = parse(&svg);
        let marks = doc.with_color("rect", BLUE_HEX);
        assert_eq!(marks.len(), 3);
        for m in &marks {
            assert_eq!((m.num("width"), m.num("height")), (5.0, 5.0));
            let (x, y) = centre(m);
            assert!(
                xs.contains(&(x as i32)) && ys.contains(&(y as i32)),
                "{m:?}"
            );
        }
        // Evenly spaced data are evenly spaced on the chart.
        let (a, m, b) = (centre(marks[0]), centre(marks[1]), centre(marks[2]));
        assert!((m.0 - (a.0 + b.0) / 2.0).abs() <= 1.0 && (m.1 - (a.1 + b.1) / 2.0).abs() <= 1.0);
    }

    #[test]
    fn lines_stay_inside_the_plot_area() {
        let points = vec![(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)];
        let mut svg = String::new();
        let (xs, ys) = draw_chart(
            &mut svg,
            "",
            "",
            "",
            &[series("", points, RED, false)],
            300,
            200,
        )
        .expect("draw");
        let doc = parse(&svg);
        let lines = doc.with_color("polyline", RED_HEX);
        assert_eq!(lines.len(), 1);
        for (x, y) in lines[0].points() {
            assert!(
                xs.contains(&(x as i32)) && ys.contains(&(y as i32)),
                "({x}, {y}) outside {xs:?} × {ys:?}"
            );
        }
    }

    #[test]
    fn unusable_points_leave_gaps_and_lone_points_are_dots() {
        let points = vec![
            (0.0, 1.0),
            (1.0, 2.0),
            (2.0, f64::NAN),
            (3.0, 1.5),
            (4.0, f64::INFINITY),
            (5.0, 1.0),
            (6.0, 0.5),
        ];
        let svg =
            render_svg("", "", "", &[series("", points, RED, false)], 800, 500).expect("render");
        let doc = parse(&svg);
        let lines = doc.with_color("polyline", RED_HEX);
        assert_eq!(
            lines.iter().map(|l| l.points().len()).collect::<Vec<_>>(),
            [2, 2]
        );
        let dots = doc.with_color("rect", RED_HEX);
        assert_eq!(dots.len(), 1, "the lone point at x = 3");
        assert_eq!((dots[0].num("width"), dots[0].num("height")), (3.0, 3.0));
    }

    #[test]
    fn step_ticks_are_whole_numbers() {
        assert_eq!(x_tick(&900.0), "900");
        assert_eq!(x_tick(&0.0), "0");
        assert_eq!(x_tick(&-20.0), "-20");
        assert_eq!(x_tick(&2.5), "2.5");
        assert_eq!(x_tick(&0.25), "0.25");
    }

    #[test]
    fn data_range_pads_and_widens_degenerate_ranges() {
        let (lo, hi) = data_range([1.0, 3.0].into_iter(), 0.05);
        assert!((lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12);
        assert_eq!(data_range([5.0, 5.0].into_iter(), 0.05), (4.5, 5.5));
        assert_eq!(data_range([0.0].into_iter(), 0.05), (-1.0, 1.0));
        assert_eq!(data_range(std::iter::empty(), 0.05), (0.0, 1.0));
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let nan = f64::NAN;
        let inf = f64::INFINITY;
        let cases: Vec<Vec<Series>> = vec![
            vec![],
            vec![series("empty", vec![], RED, false)],
            vec![series("one", vec![(3.0, 2.0)], RED, false)],
            vec![series("one", vec![(3.0, 2.0)], RED, true)],
            vec![series(
                "flat",
                vec![(0.0, 2.0), (5.0, 2.0), (9.0, 2.0)],
                RED,
                false,
            )],
            vec![series("zero", vec![(0.0, 0.0), (0.0, 0.0)], RED, false)],
            vec![series(
                "nan",
                vec![
                    (0.0, nan),
                    (1.0, 1.0),
                    (nan, 2.0),
                    (3.0, inf),
                    (4.0, 0.5),
                    (5.0, -inf),
                ],
                RED,
                false,
            )],
            vec![series("all nan", vec![(nan, nan), (inf, -inf)], RED, true)],
            vec![series(
                "huge",
                vec![(-1e299, 1e299), (1e299, -1e299), (f64::MAX, 0.0)],
                RED,
                false,
            )],
            vec![series(
                "tiny",
                vec![(0.0, 1e-310), (1.0, 2e-310), (2.0, 5e-324)],
                RED,
                false,
            )],
            vec![series(
                "near",
                vec![(0.0, 1.0), (1.0, 1.0 + 1e-15)],
                RED,
                false,
            )],
            vec![series(
                "ünïcode ✓ <&>",
                vec![(0.0, 1.0), (1.0, 2.0)],
                RED,
                false,
            )],
        ];
        for (i, case) in cases.iter().enumerate() {
            for (w, h) in [(800, 500), (0, 0), (1, 1), (200, 150), (5000, 10)] {
                let svg = render_svg("Tïtle", "x", "y", case, w, h)
                    .unwrap_or_else(|e| panic!("case {i} at {w}x{h}: {e}"));
                let doc = parse(&svg);
                let (dw, dh) = (doc.elements[0].num("width"), doc.elements[0].num("height"));
                assert!(dw >= f64::from(MIN_SIZE.0) && dh >= f64::from(MIN_SIZE.1));
                assert!(dw <= f64::from(MAX_SIDE) && dh <= f64::from(MAX_SIDE));
            }
        }
        // A very long title and labels run off the picture, not a panic.
        let long = "x".repeat(10_000);
        render_svg(
            &long,
            &long,
            &long,
            &[series(&long, vec![(0.0, 1.0)], RED, false)],
            0,
            0,
        )
        .expect("render");
    }

    #[test]
    fn the_same_input_gives_the_same_bytes() {
        let s = vec![
            series(
                "train",
                (0..200)
                    .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                    .collect(),
                RED,
                false,
            ),
            series(
                "val",
                vec![(0.0, 1.0), (100.0, 0.1), (199.0, 0.05)],
                BLUE,
                true,
            ),
        ];
        let a = render_svg("run", "step", "loss", &s, 800, 500).expect("render");
        let b = render_svg("run", "step", "loss", &s, 800, 500).expect("render");
        assert_eq!(a, b);
    }

    #[test]
    fn write_svg_writes_the_file_atomically() {
        let dir = std::env::temp_dir().join(format!("kaiwa-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("loss.svg");
        let s = series("train", vec![(0.0, 2.0), (1.0, 1.0)], RED, false);
        write_svg(&path, "loss", "step", "loss", &[s]).expect("write");
        let text = std::fs::read_to_string(&path).expect("read back");
        assert_eq!(parse(&text).elements[0].num("width"), 800.0);
        // Nothing but the picture is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["loss.svg"]);

        let missing = dir.join("no-such-dir").join("loss.svg");
        let err = write_svg(&missing, "", "", "", &[]).expect_err("no directory");
        assert!(matches!(err, PlotError::Io { .. }));
        // The error names the file it could not write (the temporary file's name is random now,
        // from `fsio::write_atomic`).
        assert!(err.to_string().contains("no-such-dir/loss.svg"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
