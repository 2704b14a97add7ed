//! TFRecord framing, the container of TensorBoard event files: u64 length, masked
//! crc32c(length), data, masked crc32c(data), all little-endian.

/// One record around `data`.
pub(super) fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend(len);
    r.extend(masked_crc32c(&len).to_le_bytes());
    r.extend(data);
    r.extend(masked_crc32c(data).to_le_bytes());
    r
}

/// The payloads of a TFRecord file, each with its byte offset, every CRC checked.
pub(super) fn records(mut rest: &[u8]) -> Result<Vec<(usize, &[u8])>, String> {
    let mut out = Vec::new();
    let mut offset = 0usize;
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(format!("truncated record header at byte {offset}"));
        }
        if masked_crc32c(&rest[..8]) != le_u32(&rest[8..12]) {
            return Err(format!("length CRC mismatch at byte {offset}"));
        }
        let len = u64::from_le_bytes([
            rest[0], rest[1], rest[2], rest[3], rest[4], rest[5], rest[6], rest[7],
        ]);
        let end = usize::try_from(len)
            .ok()
            .and_then(|n| n.checked_add(16))
            .filter(|&end| end <= rest.len())
            .ok_or_else(|| format!("truncated record at byte {offset} (needs {len} data bytes)"))?;
        let data = &rest[12..end - 4];
        if masked_crc32c(data) != le_u32(&rest[end - 4..end]) {
            return Err(format!("data CRC mismatch in record at byte {offset}"));
        }
        out.push((offset, data));
        rest = &rest[end..];
        offset += end;
    }
    Ok(out)
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            // 0x82F63B78 is the Castagnoli polynomial 0x1EDC6F41, bit-reversed.
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

pub fn crc32c(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| {
        CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord stores CRCs masked, so CRCs of data that itself holds CRCs stay well-distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // TF writes this as ((crc >> 15) | (crc << 17)) + 0xa282ead8.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}
