//! Checks a GGUF's header before candle trusts it. candle 0.11 bounds string and array lengths
//! by the file size, but divides by `general.alignment` (0 panics) and multiplies tensor dims
//! without overflow checks (a wrapped element count panics or allocates at random). These two
//! walks find such files first; everything else is left to candle's own errors.

use candle_core::quantized::gguf_file::Content;
use std::io::{Read, Seek, SeekFrom};

/// `general.alignment` must not be zero; found by walking the metadata without keeping it.
/// Any other defect stops the walk quietly: candle's reader reports it. Leaves `r` at the
/// start, where candle's reader begins.
pub(super) fn alignment(r: &mut (impl Read + Seek)) -> Result<(), String> {
    let found = walk_for_alignment(r);
    r.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    match found {
        Some(0) => Err("metadata `general.alignment` is 0".into()),
        _ => Ok(()),
    }
}

fn walk_for_alignment(r: &mut (impl Read + Seek)) -> Option<u64> {
    let len = r.seek(SeekFrom::End(0)).ok()?;
    r.seek(SeekFrom::Start(0)).ok()?;
    let mut w = Walker { r, len, long: true };
    if w.u32()? != 0x4655_4747 {
        return None;
    }
    // Version 1 has 4-byte lengths and counts, later versions 8.
    w.long = w.u32()? != 1;
    let _tensors = w.length()?;
    let kvs = w.length()?;
    for _ in 0..kvs {
        let key_len = w.length()?;
        let key = w.bytes(key_len)?;
        let ty = w.u32()?;
        if key == b"general.alignment" {
            return w.integer(ty);
        }
        w.skip_value(ty, 0)?;
    }
    None
}

struct Walker<'a, R> {
    r: &'a mut R,
    len: u64,
    long: bool,
}

impl<R: Read + Seek> Walker<'_, R> {
    fn remaining(&mut self) -> Option<u64> {
        Some(self.len.saturating_sub(self.r.stream_position().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        self.r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn length(&mut self) -> Option<u64> {
        if self.long {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }
    /// `n` bytes, read only when the file has them.
    fn bytes(&mut self, n: u64) -> Option<Vec<u8>> {
        if n > self.remaining()? || n > 1 << 20 {
            self.skip(n)?;
            return Some(vec![]);
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).ok()?;
        Some(b)
    }
    fn skip(&mut self, n: u64) -> Option<()> {
        if n > self.remaining()? {
            return None;
        }
        self.r
            .seek(SeekFrom::Current(i64::try_from(n).ok()?))
            .ok()?;
        Some(())
    }
    /// The value of an entry of the types candle reads an alignment from (u8/i8 to u32/i32).
    fn integer(&mut self, ty: u32) -> Option<u64> {
        let mut b = [0u8; 8];
        let n = match ty {
            0 | 1 => 1,
            2 | 3 => 2,
            4 | 5 => 4,
            _ => return None,
        };
        self.r.read_exact(&mut b[..n]).ok()?;
        Some(u64::from_le_bytes(b))
    }
    fn skip_value(&mut self, ty: u32, depth: usize) -> Option<()> {
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.length()?;
                self.skip(n)
            }
            9 if depth < 2 => {
                let ety = self.u32()?;
                let n = self.length()?;
                for _ in 0..n {
                    // Every element takes at least a byte: a count beyond the file ends here.
                    if self.remaining()? == 0 {
                        return None;
                    }
                    self.skip_value(ety, depth + 1)?;
                }
                Some(())
            }
            _ => None,
        }
    }
}

/// Every tensor's element count and byte size must be computable without overflow and fit
/// in the file; returns the first tensor that does not, with why.
pub(super) fn tensors(content: &Content, file_len: u64) -> Result<(), String> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let dims = info.shape.dims();
        let bad = |why: &str| Err(format!("tensor `{name}` of dims {dims:?}: {why}"));
        let Some(elems) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            return bad("element count overflows");
        };
        let (block, size) = (info.ggml_dtype.block_size(), info.ggml_dtype.type_size());
        if block == 0 || !elems.is_multiple_of(block) {
            return bad(&format!("not a whole number of {block}-element blocks"));
        }
        let bytes = (elems / block).checked_mul(size).map(|b| b as u64);
        let end = bytes.and_then(|b| {
            content
                .tensor_data_offset
                .checked_add(info.offset)?
                .checked_add(b)
        });
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                // The file offset, comparable with its length (the header stores it relative
                // to the data section).
                let at = content.tensor_data_offset.saturating_add(info.offset);
                return bad(&format!(
                    "needs {} bytes at file offset {at}, the file has {file_len} (truncated?)",
                    bytes.map_or("too many".into(), |b| b.to_string()),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use std::io::Cursor;

    fn file(alignment: Option<u32>) -> Vec<u8> {
        let t = QTensor::quantize(
            &Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let name = gguf_file::Value::String("llama".into());
        let tokens = gguf_file::Value::Array(vec![gguf_file::Value::String("a".into())]);
        let align = gguf_file::Value::U32(alignment.unwrap_or(32));
        let mut md = vec![
            ("general.architecture", &name),
            ("tokenizer.ggml.tokens", &tokens),
        ];
        if alignment.is_some() {
            md.push(("general.alignment", &align));
        }
        let mut c = Cursor::new(vec![]);
        gguf_file::write(&mut c, &md, &[("w", &t)]).unwrap();
        c.into_inner()
    }

    #[test]
    fn zero_alignment_is_found_behind_other_metadata() {
        let msg = alignment(&mut Cursor::new(file(Some(0)))).unwrap_err();
        assert!(msg.contains("general.alignment"), "{msg}");
        // Files that pass are left at the start for candle, which then reads them whole.
        for ok in [file(Some(32)), file(None)] {
            let mut c = Cursor::new(ok);
            alignment(&mut c).unwrap();
            assert_eq!(Content::read(&mut c).unwrap().tensor_infos.len(), 1);
        }
        // Truncated or foreign files are candle's to report.
        assert!(alignment(&mut Cursor::new(file(Some(0))[..40].to_vec())).is_ok());
        assert!(alignment(&mut Cursor::new(b"not a gguf".to_vec())).is_ok());
    }

    #[test]
    fn tensor_sizes_are_checked_against_the_file() {
        let b = file(Some(32));
        let content = Content::read(&mut Cursor::new(&b)).unwrap();
        assert!(tensors(&content, b.len() as u64).is_ok());
        let msg = tensors(&content, b.len() as u64 - 1).unwrap_err();
        assert!(
            msg.contains("tensor `w`") && msg.contains("needs 256 bytes"),
            "{msg}"
        );
    }
}
