//! ONNX external data: the weights moved out of the graph into a file beside it
//! (`model.onnx_data`), as Optimum stores large models.

use std::io::Write;
use std::path::Path;

use tract_onnx::pb::{self, ModelProto};

use crate::model::ModelError;

/// Moves every initializer larger than a few values into `data_path` (ONNX external data).
pub(super) fn move_initializers_to_file(
    model: &mut ModelProto,
    data_path: &Path,
) -> Result<(), ModelError> {
    let location = data_path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            ModelError::Export(format!("bad external data path {}", data_path.display()))
        })?
        .to_string();
    let file = std::fs::File::create(data_path).map_err(|e| ModelError::io(data_path, e))?;
    let mut out = std::io::BufWriter::new(file);
    let mut offset = 0usize;
    let graph = model.graph.as_mut().expect("built above");
    for t in graph
        .initializer
        .iter_mut()
        .filter(|t| t.raw_data.len() > 64)
    {
        // Keep offsets aligned so readers may map the file.
        let pad = offset.next_multiple_of(64) - offset;
        out.write_all(&vec![0u8; pad])
            .map_err(|e| ModelError::io(data_path, e))?;
        offset += pad;
        out.write_all(&t.raw_data)
            .map_err(|e| ModelError::io(data_path, e))?;
        let length = t.raw_data.len();
        t.raw_data = Vec::new();
        t.data_location = Some(pb::tensor_proto::DataLocation::External as i32);
        t.external_data = vec![
            entry("location", &location),
            entry("offset", &offset.to_string()),
            entry("length", &length.to_string()),
        ];
        offset += length;
    }
    out.flush().map_err(|e| ModelError::io(data_path, e))
}

fn entry(key: &str, value: &str) -> pb::StringStringEntryProto {
    pb::StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}
