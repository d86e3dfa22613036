//! Loss-curve charts for training runs, written as PNG files.
//!
//! [`render_png`] draws one or more [`Series`] (for example training loss per step and
//! validation loss every few hundred steps) on a single chart: white background, a framed plot
//! area with light grey grid lines at "nice" round tick values (1, 2 or 5 × 10^k), tick labels,
//! a title, axis labels and a legend in the top-right corner of the plot area.
//!
//! Everything is rasterised here, into a plain RGB8 pixel buffer, and encoded with the `png`
//! crate. A plotting crate would bring a font stack (and often system libraries) into the
//! build for what amounts to a few lines and labels, so this module carries its own 5×7
//! bitmap font and draws lines with Bresenham's algorithm instead. Output is deterministic:
//! the same input always gives the same bytes.

use std::path::Path;

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
    #[error("encoding PNG: {0}")]
    Encode(String),
}

/// Size used by [`write_png`].
const DEFAULT_SIZE: (u32, u32) = (800, 500);
/// Smallest chart drawn; smaller requests are enlarged to this.
const MIN_SIZE: (u32, u32) = (200, 150);
/// Largest side drawn; larger requests are shrunk to this (keeps the buffer under 50 MiB).
const MAX_SIDE: u32 = 4096;

/// A coordinate magnitude beyond which points are skipped: the axis span must stay finite.
const MAX_COORD: f64 = 1e300;
/// Fraction of the y data span added above and below the data.
const Y_PAD: f64 = 0.05;

const WHITE: [u8; 3] = [255, 255, 255];
const TEXT: [u8; 3] = [25, 25, 25];
const FRAME: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];
const LEGEND_BORDER: [u8; 3] = [170, 170, 170];

/// Renders the series on one chart of `width`×`height` pixels (RGB8) and returns the PNG bytes.
///
/// The size is clamped to at least 200×150 and at most 4096 on each side. Points with a
/// non-finite (or astronomically large) coordinate are skipped; in a line series they leave a
/// gap. Series with an empty label get no legend entry.
pub fn render_png(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> Result<Vec<u8>, PlotError> {
    draw_chart(title, x_label, y_label, series, width, height).encode_png()
}

/// `render_png` at 800×500, written to `path` atomically (write to `path` + ".tmp", then rename).
pub fn write_png(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let (width, height) = DEFAULT_SIZE;
    let bytes = render_png(title, x_label, y_label, series, width, height)?;
    crate::fsio::write_atomic(path, &bytes).map_err(|source| PlotError::Io {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// Chart layout
// ---------------------------------------------------------------------------------------------

/// Draws the whole chart onto a fresh canvas.
fn draw_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> Canvas {
    let width = width.clamp(MIN_SIZE.0, MAX_SIDE);
    let height = height.clamp(MIN_SIZE.1, MAX_SIDE);
    let mut canvas = Canvas::new(width, height, WHITE);
    let layout = Layout::compute(x_label, series, width, height);

    draw_grid(&mut canvas, &layout);
    for s in series {
        draw_series(&mut canvas, &layout, s);
    }
    draw_axes(&mut canvas, &layout);
    draw_legend(&mut canvas, &layout, series);
    draw_labels(&mut canvas, &layout, title, x_label, y_label);
    canvas
}

/// The title (centred at the top, double size), the x label under the x axis and the y label
/// above the y axis.
fn draw_labels(canvas: &mut Canvas, layout: &Layout, title: &str, x_label: &str, y_label: &str) {
    canvas.clip = canvas.full();
    let s = layout.text_scale;
    let title_scale = 2 * s;
    let title_x = (i64::from(canvas.width) - text_width(title, title_scale)) / 2;
    canvas.text(title_x.max(4), 8, title, title_scale, TEXT);
    let x_label_x = layout.plot.center_x() - text_width(x_label, s) / 2;
    let x_label_y = layout.plot.bottom + TICK_LEN + 2 * GAP + GLYPH_H * s;
    canvas.text(x_label_x.max(4), x_label_y, x_label, s, TEXT);
    let y_label_y = layout.plot.top - GAP - GLYPH_H * s;
    canvas.text(MARGIN, y_label_y, y_label, s, TEXT);
}

/// Outer margin of the picture, in pixels.
const MARGIN: i64 = 8;
/// Spacing between text and the things it labels, in pixels.
const GAP: i64 = 5;
/// Length of the tick marks outside the frame, in pixels.
const TICK_LEN: i64 = 4;
/// Pixels between the frame and the first/last data position.
const INSET: i64 = 4;

/// Where everything goes: the plot rectangle, the data ranges and the ticks.
#[derive(Debug, Clone)]
struct Layout {
    /// The framed plot area (the frame is drawn on its border).
    plot: Rect,
    x: Axis,
    y: Axis,
    /// Scale factor for ordinary text (the title uses twice this).
    text_scale: i64,
}

/// One axis: its data range and the tick values inside it.
#[derive(Debug, Clone)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Layout {
    /// Sizes the margins around the labels and picks ticks that fit the plot area.
    fn compute(x_label: &str, series: &[Series], width: u32, height: u32) -> Self {
        let (w, h) = (i64::from(width), i64::from(height));
        let s = (w / 640).min(h / 400).clamp(1, 4);
        let line = GLYPH_H * s;

        // Above the plot: the double-size title, then the y label.
        let top = MARGIN + 2 * line + GAP + line + GAP;
        // Below it: tick marks, tick labels and (if any) the x label.
        let mut bottom = h - (MARGIN + TICK_LEN + GAP + line);
        if !x_label.is_empty() {
            bottom -= GAP + line;
        }
        let bottom = bottom.max(top + 20);

        let usable = |v: f64| v.is_finite() && v.abs() < MAX_COORD;
        let points = || {
            series
                .iter()
                .flat_map(|s| s.points.iter().copied())
                .filter(move |&(x, y)| usable(x) && usable(y))
        };
        let (ylo, yhi) = data_range(points().map(|p| p.1), Y_PAD);
        let (xlo, xhi) = data_range(points().map(|p| p.0), 0.0);

        let plot_h = bottom - top;
        let y = Axis::fit(ylo, yhi, plot_h, |_| line + 2 * GAP);
        let label_w = y
            .ticks
            .iter()
            .map(|&v| text_width(&format_tick(v, y.step), s))
            .max()
            .unwrap_or(0);
        let left = (MARGIN + label_w + GAP + TICK_LEN).min(w / 2);
        let right = (w - MARGIN - 3 * GLYPH_W * s).max(left + 20);
        let x = Axis::fit(xlo, xhi, right - left, |axis| {
            let widest = axis
                .ticks
                .iter()
                .map(|&v| text_width(&format_tick(v, axis.step), s))
                .max()
                .unwrap_or(0);
            widest + 3 * GLYPH_W * s
        });

        Layout {
            plot: Rect {
                left,
                top,
                right,
                bottom,
            },
            x,
            y,
            text_scale: s,
        }
    }

    /// Pixel column of data value `x` (not rounded).
    fn px(&self, x: f64) -> f64 {
        let (a, b) = (
            (self.plot.left + INSET) as f64,
            (self.plot.right - 1 - INSET) as f64,
        );
        a + (x - self.x.lo) / (self.x.hi - self.x.lo) * (b - a)
    }

    /// Pixel row of data value `y` (not rounded); larger values are higher up.
    fn py(&self, y: f64) -> f64 {
        let (a, b) = (
            (self.plot.bottom - 1 - INSET) as f64,
            (self.plot.top + INSET) as f64,
        );
        a + (y - self.y.lo) / (self.y.hi - self.y.lo) * (b - a)
    }
}

impl Axis {
    /// Picks the largest tick count (at most one tick per 50 pixels) for which neighbouring
    /// ticks are at least `min_spacing(axis)` pixels apart, so that their labels do not touch.
    /// Falls back to the fewest ticks when none fits.
    fn fit(lo: f64, hi: f64, length_px: i64, min_spacing: impl Fn(&Axis) -> i64) -> Self {
        let most = (length_px / 50).clamp(2, 12) as usize;
        let mut chosen = None;
        for target in (2..=most).rev() {
            let (step, ticks) = nice_ticks(lo, hi, target);
            let axis = Axis {
                lo,
                hi,
                step,
                ticks,
            };
            let spacing = step / (hi - lo) * length_px as f64;
            let fits = spacing >= min_spacing(&axis) as f64;
            chosen = Some(axis);
            if fits {
                break;
            }
        }
        chosen.unwrap_or(Axis {
            lo,
            hi,
            step: hi - lo,
            ticks: Vec::new(),
        })
    }
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

/// A "nice" step (1, 2 or 5 × 10^k) giving about `target` intervals over `lo..hi`, and the
/// multiples of that step inside the range. Returns no ticks for an unusable range.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (f64, Vec<f64>) {
    let span = hi - lo;
    if !(span.is_finite() && span > 0.0) {
        return (1.0, Vec::new());
    }
    let raw = span / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude);
    if !(step.is_finite() && step > 0.0) {
        return (1.0, Vec::new());
    }
    let first = (lo / step - 1e-9).ceil();
    let last = (hi / step + 1e-9).floor();
    if !(first.is_finite() && last.is_finite()) || last - first > 1000.0 {
        return (step, Vec::new());
    }
    let count = (last - first + 1.0).max(0.0) as usize;
    let ticks = (0..count)
        .map(|i| {
            let v = (first + i as f64) * step;
            if v.abs() < step * 1e-9 {
                0.0
            } else {
                v
            }
        })
        .collect();
    (step, ticks)
}

/// Formats a tick value compactly: whole numbers when `step` ≥ 1, as many decimals as the step
/// needs otherwise (0.5, 0.25, 2.35), and e-notation (3e6, 1.5e-5) when the step is at least
/// a million or below 1e-4, so that all labels of one axis use the same notation.
fn format_tick(value: f64, step: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    if !(1e-4..1e6).contains(&step) || value.abs() >= 1e10 {
        let digits = (value.abs().log10() + 1e-9).floor() - (step.log10() + 1e-9).floor();
        let precision = digits.clamp(0.0, 15.0) as usize;
        let text = format!("{value:.precision$e}");
        return match text.split_once('e') {
            Some((mantissa, exp)) if mantissa.contains('.') => {
                let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
                format!("{mantissa}e{exp}")
            }
            _ => text,
        };
    }
    let decimals = step_decimals(step);
    format!("{value:.decimals$}")
}

/// The number of decimals needed to write multiples of `step` exactly (at most 15).
fn step_decimals(step: f64) -> usize {
    let mut scaled = step;
    for decimals in 0..15 {
        if (scaled - scaled.round()).abs() <= 1e-6 * scaled.abs().max(1.0) {
            return decimals;
        }
        scaled *= 10.0;
    }
    15
}

// ---------------------------------------------------------------------------------------------
// Chart parts
// ---------------------------------------------------------------------------------------------

/// Light grey grid lines at every tick, inside the plot area.
fn draw_grid(canvas: &mut Canvas, layout: &Layout) {
    let p = layout.plot;
    canvas.clip = p;
    for &v in &layout.x.ticks {
        let x = layout.px(v).round() as i64;
        canvas.fill_rect(Rect::new(x, p.top, 1, p.height()), GRID);
    }
    for &v in &layout.y.ticks {
        let y = layout.py(v).round() as i64;
        canvas.fill_rect(Rect::new(p.left, y, p.width(), 1), GRID);
    }
}

/// The frame around the plot area, tick marks outside it and their labels.
fn draw_axes(canvas: &mut Canvas, layout: &Layout) {
    let p = layout.plot;
    canvas.clip = canvas.full();
    canvas.stroke_rect(p, FRAME);
    let s = layout.text_scale;
    for &v in &layout.x.ticks {
        let x = layout.px(v).round() as i64;
        canvas.fill_rect(Rect::new(x, p.bottom, 1, TICK_LEN), FRAME);
        let label = format_tick(v, layout.x.step);
        let lx = x - text_width(&label, s) / 2;
        canvas.text(lx, p.bottom + TICK_LEN + GAP, &label, s, TEXT);
    }
    for &v in &layout.y.ticks {
        let y = layout.py(v).round() as i64;
        canvas.fill_rect(Rect::new(p.left - TICK_LEN, y, TICK_LEN, 1), FRAME);
        let label = format_tick(v, layout.y.step);
        let lx = p.left - TICK_LEN - GAP - text_width(&label, s);
        canvas.text(lx, y - GLYPH_H * s / 2, &label, s, TEXT);
    }
}

/// Draws one series, clipped to the plot area: 2-pixel lines between consecutive usable
/// points, or a 5×5 square per point when `markers` is set.
fn draw_series(canvas: &mut Canvas, layout: &Layout, series: &Series) {
    let usable = |(x, y): (f64, f64)| {
        x.is_finite() && y.is_finite() && x.abs() < MAX_COORD && y.abs() < MAX_COORD
    };
    let color = series.color;
    canvas.clip = layout.plot.inset(1);
    if series.markers {
        for &(x, y) in series.points.iter().filter(|&&p| usable(p)) {
            let (cx, cy) = (layout.px(x).round() as i64, layout.py(y).round() as i64);
            canvas.fill_rect(Rect::new(cx - 2, cy - 2, 5, 5), color);
        }
        return;
    }
    let mut previous: Option<(f64, f64)> = None;
    let mut run_len = 0usize;
    for &point in &series.points {
        if !usable(point) {
            draw_lone_point(canvas, previous, run_len, color);
            previous = None;
            run_len = 0;
            continue;
        }
        let here = (layout.px(point.0), layout.py(point.1));
        if let Some(from) = previous {
            canvas.line(from, here, color);
        }
        previous = Some(here);
        run_len += 1;
    }
    draw_lone_point(canvas, previous, run_len, color);
}

/// A run of a line series that is a single point has no segment; show it as a 3×3 dot.
fn draw_lone_point(canvas: &mut Canvas, last: Option<(f64, f64)>, run_len: usize, color: [u8; 3]) {
    if let (Some((x, y)), 1) = (last, run_len) {
        let (x, y) = (x.round() as i64, y.round() as i64);
        canvas.fill_rect(Rect::new(x - 1, y - 1, 3, 3), color);
    }
}

/// Colour swatch and label for every series with a label, boxed in the top-right corner.
fn draw_legend(canvas: &mut Canvas, layout: &Layout, series: &[Series]) {
    let entries: Vec<&Series> = series.iter().filter(|s| !s.label.is_empty()).collect();
    if entries.is_empty() {
        return;
    }
    let s = layout.text_scale;
    let pad = GAP * s;
    let swatch_w = 16 * s;
    let row_h = (GLYPH_H + 5) * s;
    let label_w = entries
        .iter()
        .map(|e| text_width(&e.label, s))
        .max()
        .unwrap_or(0);
    let box_w = pad + swatch_w + GAP * s + label_w + pad;
    let box_h = pad + row_h * entries.len() as i64 - 5 * s + pad;
    let p = layout.plot;
    let frame = Rect::new(p.right - 8 * s - box_w, p.top + 8 * s, box_w, box_h);

    canvas.clip = p.inset(1);
    canvas.fill_rect(frame, WHITE);
    canvas.stroke_rect(frame, LEGEND_BORDER);
    for (i, entry) in entries.iter().enumerate() {
        let top = frame.top + pad + i as i64 * row_h;
        let mid = top + GLYPH_H * s / 2;
        let x0 = frame.left + pad;
        if entry.markers {
            let cx = x0 + swatch_w / 2;
            canvas.fill_rect(Rect::new(cx - 2, mid - 2, 5, 5), entry.color);
        } else {
            canvas.fill_rect(Rect::new(x0, mid - 1, swatch_w, 2), entry.color);
        }
        canvas.text(x0 + swatch_w + GAP * s, top, &entry.label, s, TEXT);
    }
}

// ---------------------------------------------------------------------------------------------
// Canvas
// ---------------------------------------------------------------------------------------------

/// An axis-aligned rectangle of pixels: columns `left..right`, rows `top..bottom`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rect {
    left: i64,
    top: i64,
    right: i64,
    bottom: i64,
}

impl Rect {
    /// The rectangle with top-left corner (`x`, `y`) and the given size.
    fn new(x: i64, y: i64, width: i64, height: i64) -> Self {
        Rect {
            left: x,
            top: y,
            right: x.saturating_add(width),
            bottom: y.saturating_add(height),
        }
    }

    fn width(&self) -> i64 {
        self.right - self.left
    }

    fn height(&self) -> i64 {
        self.bottom - self.top
    }

    fn center_x(&self) -> i64 {
        self.left + self.width() / 2
    }

    fn contains(&self, x: i64, y: i64) -> bool {
        (self.left..self.right).contains(&x) && (self.top..self.bottom).contains(&y)
    }

    /// The rectangle shrunk by `by` pixels on every side.
    fn inset(&self, by: i64) -> Self {
        Rect {
            left: self.left + by,
            top: self.top + by,
            right: self.right - by,
            bottom: self.bottom - by,
        }
    }

    /// The overlap of two rectangles (possibly empty).
    fn intersect(&self, other: &Rect) -> Self {
        Rect {
            left: self.left.max(other.left),
            top: self.top.max(other.top),
            right: self.right.min(other.right),
            bottom: self.bottom.min(other.bottom),
        }
    }
}

/// An RGB8 pixel buffer with a clip rectangle; drawing outside the clip is ignored.
struct Canvas {
    width: u32,
    height: u32,
    /// Row-major RGB triples.
    pixels: Vec<u8>,
    /// Only pixels inside this rectangle (and inside the canvas) are changed.
    clip: Rect,
}

impl Canvas {
    /// A canvas filled with `background`.
    fn new(width: u32, height: u32, background: [u8; 3]) -> Self {
        let count = width as usize * height as usize;
        let pixels = background.iter().copied().cycle().take(count * 3).collect();
        let mut canvas = Canvas {
            width,
            height,
            pixels,
            clip: Rect::new(0, 0, 0, 0),
        };
        canvas.clip = canvas.full();
        canvas
    }

    /// The whole canvas as a rectangle.
    fn full(&self) -> Rect {
        Rect::new(0, 0, i64::from(self.width), i64::from(self.height))
    }

    /// Sets one pixel, if it lies inside the clip rectangle and the canvas.
    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if !self.clip.contains(x, y) || !self.full().contains(x, y) {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        if let Some(px) = self.pixels.get_mut(i..i + 3) {
            px.copy_from_slice(&color);
        }
    }

    /// The colour of one pixel, or `None` outside the canvas.
    #[cfg(test)]
    fn get(&self, x: i64, y: i64) -> Option<[u8; 3]> {
        if !self.full().contains(x, y) {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        self.pixels.get(i..i + 3).map(|p| [p[0], p[1], p[2]])
    }

    /// Fills a rectangle.
    fn fill_rect(&mut self, rect: Rect, color: [u8; 3]) {
        let r = rect.intersect(&self.clip).intersect(&self.full());
        for y in r.top..r.bottom {
            for x in r.left..r.right {
                self.set(x, y, color);
            }
        }
    }

    /// Draws the 1-pixel outline of a rectangle (on its outermost rows and columns).
    fn stroke_rect(&mut self, r: Rect, color: [u8; 3]) {
        self.fill_rect(Rect::new(r.left, r.top, r.width(), 1), color);
        self.fill_rect(Rect::new(r.left, r.bottom - 1, r.width(), 1), color);
        self.fill_rect(Rect::new(r.left, r.top, 1, r.height()), color);
        self.fill_rect(Rect::new(r.right - 1, r.top, 1, r.height()), color);
    }

    /// Draws a 2-pixel-wide line between two points given in (fractional) pixel coordinates.
    ///
    /// The segment is first clipped to the clip rectangle (Liang–Barsky), so far-away
    /// endpoints cost nothing, then rasterised with Bresenham's algorithm and a 2×2 brush.
    fn line(&mut self, from: (f64, f64), to: (f64, f64), color: [u8; 3]) {
        let clip = self.clip.intersect(&self.full());
        let Some((a, b)) = clip_segment(from, to, clip) else {
            return;
        };
        let (mut x, mut y) = (a.0.round() as i64, a.1.round() as i64);
        let (x1, y1) = (b.0.round() as i64, b.1.round() as i64);
        let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
        let (sx, sy) = ((x1 - x).signum(), (y1 - y).signum());
        let mut err = dx + dy;
        loop {
            self.fill_rect(Rect::new(x, y, 2, 2), color);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `text` with its top-left corner at (`x`, `y`), each font pixel `scale`×`scale`.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
        let mut left = x;
        for c in text.chars() {
            let glyph = glyph(c);
            for (col, bits) in (0i64..).zip(glyph.iter()) {
                for row in 0..GLYPH_H {
                    if bits >> row & 1 == 1 {
                        let r = Rect::new(left + col * scale, y + row * scale, scale, scale);
                        self.fill_rect(r, color);
                    }
                }
            }
            left += GLYPH_ADVANCE * scale;
        }
    }

    /// Encodes the canvas as an 8-bit RGB PNG.
    fn encode_png(&self) -> Result<Vec<u8>, PlotError> {
        let encode_err = |e: png::EncodingError| PlotError::Encode(e.to_string());
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Balanced);
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer.write_image_data(&self.pixels).map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
        Ok(out)
    }
}

/// Clips the segment `a`–`b` to the pixel centres of `rect` (Liang–Barsky); `None` if nothing
/// of it is inside.
fn clip_segment(a: (f64, f64), b: (f64, f64), rect: Rect) -> Option<((f64, f64), (f64, f64))> {
    let finite = [a.0, a.1, b.0, b.1].iter().all(|v| v.is_finite());
    if !finite || rect.width() <= 0 || rect.height() <= 0 {
        return None;
    }
    let (xmin, xmax) = (rect.left as f64, (rect.right - 1) as f64);
    let (ymin, ymax) = (rect.top as f64, (rect.bottom - 1) as f64);
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [
        (-dx, a.0 - xmin),
        (dx, xmax - a.0),
        (-dy, a.1 - ymin),
        (dy, ymax - a.1),
    ] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let t = q / p;
            if p < 0.0 {
                t0 = t0.max(t);
            } else {
                t1 = t1.min(t);
            }
        }
    }
    if t0 > t1 {
        return None;
    }
    let at = |t: f64| (a.0 + t * dx, a.1 + t * dy);
    Some((at(t0), at(t1)))
}

// ---------------------------------------------------------------------------------------------
// Font
// ---------------------------------------------------------------------------------------------

/// Glyph height in font pixels (rows 0..7, top to bottom).
const GLYPH_H: i64 = 7;
/// Glyph width in font pixels.
const GLYPH_W: i64 = 5;
/// Horizontal advance per character: the glyph plus one column of spacing.
const GLYPH_ADVANCE: i64 = GLYPH_W + 1;

/// Drawn for characters the font does not cover: a hollow box.
const MISSING_GLYPH: [u8; 5] = [0x7F, 0x41, 0x41, 0x41, 0x7F];

/// 5×7 font for ASCII 0x20..=0x7E. Each glyph is five columns, left to right; bit `r` of a
/// column is the pixel in row `r`, counted from the top.
#[rustfmt::skip]
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5F, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7F, 0x14, 0x7F, 0x14], // #
    [0x24, 0x2A, 0x7F, 0x2A, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x55, 0x22, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1C, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1C, 0x00], // )
    [0x14, 0x08, 0x3E, 0x08, 0x14], // *
    [0x08, 0x08, 0x3E, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3E, 0x51, 0x49, 0x45, 0x3E], // 0
    [0x00, 0x42, 0x7F, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4B, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7F, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3C, 0x4A, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1E], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3E], // @
    [0x7E, 0x11, 0x11, 0x11, 0x7E], // A
    [0x7F, 0x49, 0x49, 0x49, 0x36], // B
    [0x3E, 0x41, 0x41, 0x41, 0x22], // C
    [0x7F, 0x41, 0x41, 0x22, 0x1C], // D
    [0x7F, 0x49, 0x49, 0x49, 0x41], // E
    [0x7F, 0x09, 0x09, 0x09, 0x01], // F
    [0x3E, 0x41, 0x49, 0x49, 0x7A], // G
    [0x7F, 0x08, 0x08, 0x08, 0x7F], // H
    [0x00, 0x41, 0x7F, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3F, 0x01], // J
    [0x7F, 0x08, 0x14, 0x22, 0x41], // K
    [0x7F, 0x40, 0x40, 0x40, 0x40], // L
    [0x7F, 0x02, 0x0C, 0x02, 0x7F], // M
    [0x7F, 0x04, 0x08, 0x10, 0x7F], // N
    [0x3E, 0x41, 0x41, 0x41, 0x3E], // O
    [0x7F, 0x09, 0x09, 0x09, 0x06], // P
    [0x3E, 0x41, 0x51, 0x21, 0x5E], // Q
    [0x7F, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7F, 0x01, 0x01], // T
    [0x3F, 0x40, 0x40, 0x40, 0x3F], // U
    [0x1F, 0x20, 0x40, 0x20, 0x1F], // V
    [0x3F, 0x40, 0x38, 0x40, 0x3F], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7F, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7F, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7F, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7F], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7E, 0x09, 0x01, 0x02], // f
    [0x08, 0x54, 0x54, 0x54, 0x3C], // g
    [0x7F, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7D, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3D, 0x00], // j
    [0x7F, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7F, 0x40, 0x00], // l
    [0x7C, 0x04, 0x18, 0x04, 0x78], // m
    [0x7C, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7C, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x14, 0x7C], // q
    [0x7C, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3F, 0x44, 0x40, 0x20], // t
    [0x3C, 0x40, 0x40, 0x20, 0x7C], // u
    [0x1C, 0x20, 0x40, 0x20, 0x1C], // v
    [0x3C, 0x40, 0x30, 0x40, 0x3C], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0C, 0x50, 0x50, 0x50, 0x3C], // y
    [0x44, 0x64, 0x54, 0x4C, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7F, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x08, 0x04, 0x08, 0x10, 0x08], // ~
];

/// The glyph for `c`, or [`MISSING_GLYPH`] outside printable ASCII.
fn glyph(c: char) -> &'static [u8; 5] {
    let index = (c as u32).wrapping_sub(0x20) as usize;
    FONT.get(index).unwrap_or(&MISSING_GLYPH)
}

/// Width in pixels of `text` drawn at `scale` (no trailing spacing column).
fn text_width(text: &str, scale: i64) -> i64 {
    let chars = text.chars().count() as i64;
    if chars == 0 {
        0
    } else {
        (chars * GLYPH_ADVANCE - 1) * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    const RED: [u8; 3] = [220, 30, 40];
    const BLUE: [u8; 3] = [30, 90, 200];

    fn series(label: &str, points: Vec<(f64, f64)>, color: [u8; 3], markers: bool) -> Series {
        Series {
            label: label.to_string(),
            points,
            color,
            markers,
        }
    }

    /// Decodes PNG bytes into (width, height, RGB pixels), checking the format is RGB8.
    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("PNG header");
        let size = reader.output_buffer_size().expect("buffer size");
        let mut buf = vec![0; size];
        let info = reader.next_frame(&mut buf).expect("PNG frame");
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn count_color(pixels: &[u8], color: [u8; 3]) -> usize {
        pixels.chunks_exact(3).filter(|p| *p == color).count()
    }

    #[test]
    fn output_is_an_rgb8_png_of_the_requested_size() {
        let s = series("train", vec![(0.0, 3.0), (10.0, 1.0)], RED, false);
        let bytes = render_png("t", "step", "loss", &[s], 640, 480).expect("render");
        let (w, h, pixels) = decode(&bytes);
        assert_eq!((w, h), (640, 480));
        assert_eq!(pixels.len(), 640 * 480 * 3);
    }

    #[test]
    fn line_series_pixels_have_the_series_colour() {
        let points: Vec<(f64, f64)> = (0..=100).map(|i| (i as f64, 2.0 * i as f64)).collect();
        let line = series("train", points, RED, false);
        let layout = Layout::compute("step", std::slice::from_ref(&line), 800, 500);
        let canvas = draw_chart(
            "title",
            "step",
            "loss",
            std::slice::from_ref(&line),
            800,
            500,
        );
        // The middle of the straight line, away from the legend and the frame.
        let (x, y) = (
            layout.px(50.0).round() as i64,
            layout.py(100.0).round() as i64,
        );
        assert_eq!(canvas.get(x, y), Some(RED));

        let bytes = render_png("title", "step", "loss", &[line], 800, 500).expect("render");
        let (_, _, pixels) = decode(&bytes);
        assert!(count_color(&pixels, RED) > 500, "a long 2-px line");

        let empty = render_png("title", "step", "loss", &[], 800, 500).expect("render");
        let (_, _, pixels) = decode(&empty);
        assert_eq!(count_color(&pixels, RED), 0);
    }

    #[test]
    fn title_and_axis_labels_are_drawn_alongside_a_legend() {
        let line = series("train", vec![(0.0, 2.0), (1.0, 1.0)], RED, false);
        let layout = Layout::compute("step", std::slice::from_ref(&line), 800, 500);
        let canvas = draw_chart("Title", "step", "loss", &[line], 800, 500);
        let p = layout.plot;
        let text_in = |r: Rect| {
            (r.top..r.bottom)
                .flat_map(|y| (r.left..r.right).map(move |x| (x, y)))
                .filter(|&(x, y)| canvas.get(x, y) == Some(TEXT))
                .count()
        };
        assert!(text_in(Rect::new(0, 0, 800, p.top - 12)) > 0, "title");
        assert!(text_in(Rect::new(0, p.top - 12, 800, 12)) > 0, "y label");
        let below_ticks = p.bottom + TICK_LEN + GAP + GLYPH_H + 1;
        assert!(
            text_in(Rect::new(0, below_ticks, 800, 500 - below_ticks)) > 0,
            "x label"
        );
        // The legend label sits inside the plot area.
        assert!(text_in(p.inset(1)) > 0, "legend");
    }

    #[test]
    fn markers_are_5x5_squares_in_the_series_colour() {
        let points = vec![(0.0, 0.0), (5.0, 5.0), (10.0, 10.0)];
        let marks = series("", points, BLUE, true);
        let layout = Layout::compute("", std::slice::from_ref(&marks), 800, 500);
        let canvas = draw_chart("", "", "", &[marks], 800, 500);
        let (x, y) = (layout.px(5.0).round() as i64, layout.py(5.0).round() as i64);
        for dy in -2..=2 {
            for dx in -2..=2 {
                assert_eq!(canvas.get(x + dx, y + dy), Some(BLUE));
            }
        }
        assert_ne!(canvas.get(x + 3, y), Some(BLUE));
        assert_ne!(canvas.get(x, y - 3), Some(BLUE));
    }

    #[test]
    fn lines_stay_inside_the_plot_area() {
        let points = vec![(0.0, 0.0), (1.0, 1.0), (2.0, 0.0)];
        let line = series("", points, RED, false);
        let layout = Layout::compute("", std::slice::from_ref(&line), 300, 200);
        let canvas = draw_chart("", "", "", &[line], 300, 200);
        let inner = layout.plot.inset(1);
        for y in 0..200 {
            for x in 0..300 {
                if canvas.get(x, y) == Some(RED) {
                    assert!(inner.contains(x, y), "({x}, {y}) outside {inner:?}");
                }
            }
        }
    }

    #[test]
    fn nice_ticks_are_round_numbers() {
        let (step, ticks) = nice_ticks(0.0, 1000.0, 5);
        assert_eq!(step, 200.0);
        assert_eq!(ticks, vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);

        let (step, ticks) = nice_ticks(2.31, 2.39, 4);
        assert!((step - 0.02).abs() < 1e-12, "step {step}");
        let labels: Vec<String> = ticks.iter().map(|&v| format_tick(v, step)).collect();
        assert_eq!(labels, ["2.32", "2.34", "2.36", "2.38"]);

        let (step, ticks) = nice_ticks(-3.0, 7.0, 5);
        assert_eq!(step, 2.0);
        assert_eq!(ticks, vec![-2.0, 0.0, 2.0, 4.0, 6.0]);

        // Steps are always 1, 2 or 5 times a power of ten.
        for (lo, hi, target) in [(0.0, 0.37, 6), (13.0, 9876.0, 7), (-1e-3, 1e-3, 3)] {
            let (step, ticks) = nice_ticks(lo, hi, target);
            let mantissa = step / 10f64.powf(step.log10().floor());
            assert!(
                [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-9),
                "step {step}"
            );
            assert!(ticks.iter().all(|&t| t >= lo && t <= hi));
            assert!(ticks.len() >= 2);
        }

        assert!(nice_ticks(1.0, 1.0, 5).1.is_empty());
        assert!(nice_ticks(f64::NAN, 1.0, 5).1.is_empty());
    }

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(format_tick(1000.0, 500.0), "1000");
        assert_eq!(format_tick(2500.0, 500.0), "2500");
        assert_eq!(format_tick(0.5, 0.5), "0.5");
        assert_eq!(format_tick(0.25, 0.25), "0.25");
        assert_eq!(format_tick(2.35, 0.05), "2.35");
        assert_eq!(format_tick(0.0, 0.1), "0");
        assert_eq!(format_tick(-1.5, 0.5), "-1.5");
        assert_eq!(format_tick(3.0e6, 1.0e6), "3e6");
        assert_eq!(format_tick(1.5e6, 5.0e5), "1500000");
        assert_eq!(format_tick(1.5e7, 5.0e6), "1.5e7");
        assert_eq!(format_tick(1.0e7, 5.0e6), "1e7");
        assert_eq!(format_tick(1.5e-5, 5.0e-6), "1.5e-5");
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
                "ünïcode ✓",
                vec![(0.0, 1.0), (1.0, 2.0)],
                RED,
                false,
            )],
        ];
        for (i, case) in cases.iter().enumerate() {
            for (w, h) in [(800, 500), (0, 0), (1, 1), (200, 150), (5000, 10)] {
                let bytes = render_png("Tïtle", "x", "y", case, w, h)
                    .unwrap_or_else(|e| panic!("case {i} at {w}x{h}: {e}"));
                let (dw, dh, _) = decode(&bytes);
                assert!(dw >= MIN_SIZE.0 && dh >= MIN_SIZE.1 && dw <= MAX_SIDE && dh <= MAX_SIDE);
            }
        }
        // A very long title and labels are clipped, not a panic.
        let long = "x".repeat(10_000);
        render_png(
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
        let a = render_png("run", "step", "loss", &s, 800, 500).expect("render");
        let b = render_png("run", "step", "loss", &s, 800, 500).expect("render");
        assert_eq!(a, b);
    }

    #[test]
    fn unknown_characters_draw_as_a_box() {
        assert_eq!(glyph('é'), &MISSING_GLYPH);
        assert_eq!(glyph('\n'), &MISSING_GLYPH);
        assert_eq!(glyph('A'), &FONT[0x21]);
        assert_eq!(glyph('~'), &FONT[94]);
        assert_eq!(text_width("ab", 1), 11);
        assert_eq!(text_width("", 2), 0);
    }

    #[test]
    fn write_png_writes_the_file_atomically() {
        let dir = std::env::temp_dir().join(format!("kaiwa-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("loss.png");
        let s = series("train", vec![(0.0, 2.0), (1.0, 1.0)], RED, false);
        write_png(&path, "loss", "step", "loss", &[s]).expect("write");
        let bytes = std::fs::read(&path).expect("read back");
        assert_eq!(decode(&bytes).0, 800);
        // Nothing but the picture is left beside it.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["loss.png"]);

        let missing = dir.join("no-such-dir").join("loss.png");
        let err = write_png(&missing, "", "", "", &[]).expect_err("no directory");
        assert!(matches!(err, PlotError::Io { .. }));
        // The error names the file it could not write (the temporary file's name is random now,
        // from `fsio::write_atomic`).
        assert!(err.to_string().contains("no-such-dir/loss.png"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
