//! Just enough of the GGUF format to read a model's architecture, layer count and hidden size
//! from its header, without loading weights: the planner checks prima's layer windows with it, and
//! `check-config` uses it to tell a real model from an empty, cut-off or wrong file.
//!
//! The file is untrusted input (a download, a copy, anything at the configured path), so every
//! count and length is checked against the bytes that are actually left before it is used, sizes
//! are computed with checked arithmetic, and nested arrays are skipped with a bounded depth
//! instead of unbounded recursion: a crafted header must give an error, never a crash or a
//! multi-gigabyte allocation.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub architecture: String,
    pub block_count: u32,
    pub embedding_length: Option<u32>,
}

/// llama.cpp reads no nested arrays at all; the format allows them, so skip a few levels and
/// refuse deeper ones rather than recursing once per level of a hostile file.
const MAX_ARRAY_DEPTH: usize = 8;
/// GGUF keys are at most 65535 bytes; the strings we keep (keys, names, the architecture) are
/// short, so this also bounds what one read allocates.
const MAX_KEPT_STRING: u64 = 65_535;
/// ggml tensors have at most 4 dimensions (GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

const TYPE_ARRAY: u32 = 9;
const TYPE_STRING: u32 = 8;

pub fn read_info(path: &Path) -> Result<ModelInfo> {
    let context = || format!("model {}", path.display());
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow!("cannot read it: {e}"))
        .with_context(context)?;
    if meta.is_dir() {
        return Err(anyhow!("is a directory, not a GGUF file")).with_context(context);
    }
    if !meta.is_file() {
        return Err(anyhow!("is not a regular file")).with_context(context);
    }
    if meta.len() == 0 {
        return Err(anyhow!("is empty (0 bytes)")).with_context(context);
    }
    let f = File::open(path)
        .map_err(|e| anyhow!("cannot open it: {e}"))
        .with_context(context)?;
    parse(BufReader::new(f), meta.len()).with_context(context)
}

/// Reads the header of a GGUF of `len` bytes.
fn parse(r: impl Read, len: u64) -> Result<ModelInfo> {
    let mut r = Reader {
        r,
        pos: 0,
        len,
        place: "the file header".into(),
    };
    let head = r.head()?;
    if head != *b"GGUF" {
        bail!("{}", not_gguf(&head, &mut r));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        if (2..=3).contains(&version.swap_bytes()) {
            bail!(
                "a big-endian GGUF (version {}), which is not supported",
                version.swap_bytes()
            );
        }
        bail!("GGUF version {version} is not supported (expected 2 or 3)");
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    // Each metadata entry takes at least 13 bytes (key length, type, a one-byte value) and each
    // tensor description at least 24 (name length, dimension count, type, offset).
    if kv_count > r.remaining() / 13 {
        bail!(
            "truncated after {len} bytes, or a corrupt header: it claims {kv_count} metadata \
             entries, but only {} bytes follow",
            r.remaining()
        );
    }
    if tensor_count > r.remaining() / 24 {
        bail!(
            "truncated after {len} bytes, or a corrupt header: it claims {tensor_count} tensors, \
             but only {} bytes follow",
            r.remaining()
        );
    }

    let mut arch = None;
    let mut ints: Vec<(String, u32, Option<i128>)> = Vec::new();
    for i in 0..kv_count {
        r.place = format!("metadata entry {} of {kv_count}", i + 1);
        let key = r.kept_string()?;
        r.place = format!("metadata `{key}`");
        let ty = r.u32()?;
        if key == "general.architecture" {
            if ty != TYPE_STRING {
                bail!(
                    "general.architecture has type {}, expected a string",
                    type_name(ty)
                );
            }
            arch = Some(r.kept_string()?);
        } else if key.ends_with(".block_count")
            || key.ends_with(".embedding_length")
            || key == "general.alignment"
        {
            let v = read_int(&mut r, ty, &key)?;
            ints.push((key, ty, v));
        } else {
            skip_value(&mut r, ty, &key, 0)?;
        }
    }
    let int = |key: &str| -> Result<Option<u32>> {
        match ints.iter().find(|(k, _, _)| k == key) {
            None => Ok(None),
            Some((_, ty, None)) => bail!("{key} has type {}, expected an integer", type_name(*ty)),
            Some((_, _, Some(v))) => u32::try_from(*v)
                .map(Some)
                .map_err(|_| anyhow!("{key} = {v} is out of range (expected 0 to {})", u32::MAX)),
        }
    };
    let architecture = arch.context("no general.architecture key")?;
    let block_count = int(&format!("{architecture}.block_count"))?
        .with_context(|| format!("no {architecture}.block_count key"))?;
    if block_count == 0 {
        bail!("{architecture}.block_count is 0: a model has at least one layer");
    }
    let embedding_length = int(&format!("{architecture}.embedding_length"))?;
    let alignment = int("general.alignment")?.map_or(DEFAULT_ALIGNMENT, u64::from);
    if !alignment.is_power_of_two() {
        bail!("general.alignment = {alignment} is not a power of 2");
    }

    let data_end = tensor_data_end(&mut r, tensor_count, alignment)?;
    if let Some((name, end)) = data_end {
        if end > len {
            bail!(
                "truncated after {len} bytes: tensor `{name}` ends at byte {end} \
                 (an interrupted download or copy?)"
            );
        }
    }
    Ok(ModelInfo {
        architecture,
        block_count,
        embedding_length,
    })
}

/// Reads the tensor descriptions and returns the tensor whose data ends furthest into the file,
/// with that end as an absolute offset: a file shorter than that was cut off.
fn tensor_data_end(
    r: &mut Reader<impl Read>,
    tensor_count: u64,
    alignment: u64,
) -> Result<Option<(String, u64)>> {
    let mut furthest: Option<(String, u64)> = None;
    for i in 0..tensor_count {
        r.place = format!("tensor description {} of {tensor_count}", i + 1);
        let name = r.kept_string()?;
        r.place = format!("tensor `{name}`");
        let n_dims = r.u32()?;
        if n_dims > MAX_DIMS {
            bail!("tensor `{name}` has {n_dims} dimensions (ggml allows at most {MAX_DIMS})");
        }
        let mut elements: u64 = 1;
        for _ in 0..n_dims {
            let d = r.u64()?;
            elements = elements
                .checked_mul(d)
                .with_context(|| format!("tensor `{name}`: its shape overflows 64 bits"))?;
        }
        let ty = r.u32()?;
        let offset = r.u64()?;
        // Unknown or retired types: only the first byte is known to be needed.
        let bytes = match ggml_block(ty) {
            Some((block, size)) => (elements / block).checked_mul(size),
            None => Some(u64::from(elements > 0)),
        };
        let end = bytes.and_then(|b| offset.checked_add(b)).with_context(|| {
            format!("tensor `{name}`: offset {offset} + its size overflows 64 bits")
        })?;
        if furthest.as_ref().is_none_or(|(_, e)| end > *e) {
            furthest = Some((name, end));
        }
    }
    let Some((name, end)) = furthest else {
        return Ok(None);
    };
    let data_start = r
        .pos
        .checked_next_multiple_of(alignment)
        .context("the data section's offset overflows 64 bits")?;
    let end = data_start
        .checked_add(end)
        .with_context(|| format!("tensor `{name}`: its end overflows 64 bits"))?;
    Ok(Some((name, end)))
}

/// (elements per block, bytes per block) of the ggml tensor types, as ggml's type traits give
/// them; retired types (4, 5, 31-33, 36-38) are left out.
fn ggml_block(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),      // f32
        1 => (1, 2),      // f16
        2 => (32, 18),    // q4_0
        3 => (32, 20),    // q4_1
        6 => (32, 22),    // q5_0
        7 => (32, 24),    // q5_1
        8 => (32, 34),    // q8_0
        9 => (32, 36),    // q8_1
        10 => (256, 84),  // q2_K
        11 => (256, 110), // q3_K
        12 => (256, 144), // q4_K
        13 => (256, 176), // q5_K
        14 => (256, 210), // q6_K
        15 => (256, 292), // q8_K
        16 => (256, 66),  // iq2_xxs
        17 => (256, 74),  // iq2_xs
        18 => (256, 98),  // iq3_xxs
        19 => (256, 50),  // iq1_s
        20 => (32, 18),   // iq4_nl
        21 => (256, 110), // iq3_s
        22 => (256, 82),  // iq2_s
        23 => (256, 136), // iq4_xs
        24 => (1, 1),     // i8
        25 => (1, 2),     // i16
        26 => (1, 4),     // i32
        27 => (1, 8),     // i64
        28 => (1, 8),     // f64
        29 => (256, 56),  // iq1_m
        30 => (1, 2),     // bf16
        34 => (256, 54),  // tq1_0
        35 => (256, 66),  // tq2_0
        39 => (32, 17),   // mxfp4
        _ => return None,
    })
}

/// What a file that does not start with "GGUF" looks like, to name the likely mistake.
fn not_gguf(head: &[u8; 4], r: &mut Reader<impl Read>) -> String {
    let mut more = head.to_vec();
    let mut rest = [0u8; 28];
    let extra = rest
        .len()
        .min(usize::try_from(r.remaining()).unwrap_or(usize::MAX));
    if r.fill(&mut rest[..extra]).is_ok() {
        more.extend(&rest[..extra]);
    }
    let guess = if more.starts_with(b"PK\x03\x04") {
        ", a zip archive?"
    } else if more.starts_with(&[0x1f, 0x8b]) {
        ", a gzip file?"
    } else if more.starts_with(b"version https://git-lfs") {
        ", a Git LFS pointer: fetch the model itself with `git lfs pull`"
    } else if more.trim_ascii_start().starts_with(b"<") {
        ", an HTML or XML page: a failed download?"
    } else if [b"lmgg", b"fmgg", b"tjgg"].contains(&head) {
        ", a GGML model from before GGUF: convert it to GGUF"
    } else if more.get(8) == Some(&b'{') {
        ", a safetensors file? convert it to GGUF"
    } else {
        ""
    };
    format!(
        "not a GGUF file (starts with {}{guess})",
        head.escape_ascii()
    )
}

/// A reader that knows the file's length and where it is, so it can refuse a length that runs
/// past the end before reading or allocating, and say where the file was cut off.
struct Reader<R> {
    r: R,
    pos: u64,
    len: u64,
    /// What is being read, for messages.
    place: String,
}

impl<R: Read> Reader<R> {
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn truncated(&self) -> anyhow::Error {
        anyhow!("truncated after {} bytes (in {})", self.len, self.place)
    }

    fn need(&self, n: u64) -> Result<()> {
        if n > self.remaining() {
            return Err(self.truncated());
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        self.need(buf.len() as u64)?;
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            // The file shrank while we read it.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(self.truncated()),
            Err(e) => Err(anyhow!("read error at byte {}: {e}", self.pos)),
        }
    }

    /// The magic: a file shorter than 4 bytes that starts like one is a cut-off GGUF.
    fn head(&mut self) -> Result<[u8; 4]> {
        if self.len < 4 {
            let mut b = vec![0u8; self.len as usize];
            self.fill(&mut b)?;
            if b"GGUF".starts_with(&b) {
                return Err(self.truncated());
            }
            bail!(
                "not a GGUF file (only {} bytes: {})",
                self.len,
                b.escape_ascii()
            );
        }
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn string_len(&mut self) -> Result<u64> {
        let len = self.u64()?;
        if len > self.remaining() {
            bail!(
                "truncated after {} bytes, or corrupt (in {}: a string of {len} bytes, but only {} \
                 are left)",
                self.len,
                self.place,
                self.remaining()
            );
        }
        Ok(len)
    }

    /// A string we keep (a key, a name, the architecture): bounded so one read cannot allocate
    /// more than [`MAX_KEPT_STRING`].
    fn kept_string(&mut self) -> Result<String> {
        let len = self.string_len()?;
        if len > MAX_KEPT_STRING {
            bail!(
                "{}: string of {len} bytes, longer than GGUF allows for a key or name ({MAX_KEPT_STRING})",
                self.place
            );
        }
        let mut b = vec![0u8; len as usize];
        self.fill(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        self.need(n)?;
        let copied = std::io::copy(&mut (&mut self.r).take(n), &mut std::io::sink())
            .map_err(|e| anyhow!("read error at byte {}: {e}", self.pos))?;
        if copied != n {
            return Err(self.truncated());
        }
        self.pos += n;
        Ok(())
    }
}

fn type_name(ty: u32) -> &'static str {
    match ty {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "unknown",
    }
}

fn scalar_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

/// An integer value (any width, signed or not); None for other types, which are skipped.
fn read_int(r: &mut Reader<impl Read>, ty: u32, key: &str) -> Result<Option<i128>> {
    let Some(size) = scalar_size(ty) else {
        skip_value(r, ty, key, 0)?;
        return Ok(None);
    };
    let mut b = [0u8; 8];
    r.fill(&mut b[..size as usize])?;
    let [b0, b1, b2, b3, ..] = b;
    Ok(Some(match ty {
        0 => i128::from(b0),
        1 => i128::from(b0 as i8),
        2 => i128::from(u16::from_le_bytes([b0, b1])),
        3 => i128::from(i16::from_le_bytes([b0, b1])),
        4 => i128::from(u32::from_le_bytes([b0, b1, b2, b3])),
        5 => i128::from(i32::from_le_bytes([b0, b1, b2, b3])),
        10 => i128::from(u64::from_le_bytes(b)),
        11 => i128::from(i64::from_le_bytes(b)),
        _ => return Ok(None), // floats and bools
    }))
}

/// Skips one value of type `ty`; `depth` counts the arrays it sits in.
fn skip_value(r: &mut Reader<impl Read>, ty: u32, key: &str, depth: usize) -> Result<()> {
    match ty {
        TYPE_STRING => {
            let len = r.string_len()?;
            r.skip(len)
        }
        TYPE_ARRAY => {
            if depth >= MAX_ARRAY_DEPTH {
                bail!(
                    "metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH} levels \
                     (llama.cpp reads no nested arrays at all)"
                );
            }
            let inner = r.u32()?;
            let n = r.u64()?;
            let left = r.remaining();
            let total = r.len;
            let too_many = || {
                anyhow!(
                    "truncated after {} bytes, or corrupt (in metadata `{key}`: an array of {n} \
                     {} elements cannot fit in the {left} bytes left)",
                    total,
                    type_name(inner)
                )
            };
            if let Some(size) = scalar_size(inner) {
                let bytes = n
                    .checked_mul(size)
                    .filter(|b| *b <= left)
                    .ok_or_else(too_many)?;
                return r.skip(bytes);
            }
            // A string takes at least its 8-byte length, an array its type and count.
            let least = match inner {
                TYPE_STRING => 8,
                TYPE_ARRAY => 12,
                t => bail!("metadata `{key}`: array of unknown type {t}"),
            };
            if n > left / least {
                return Err(too_many());
            }
            for _ in 0..n {
                skip_value(r, inner, key, depth + 1)?;
            }
            Ok(())
        }
        t => {
            let size =
                scalar_size(t).with_context(|| format!("metadata `{key}` has unknown type {t}"))?;
            r.skip(size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv_string(out: &mut Vec<u8>, key: &str, value: &str) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(8u32.to_le_bytes());
        out.extend((value.len() as u64).to_le_bytes());
        out.extend(value.as_bytes());
    }

    fn kv_u32(out: &mut Vec<u8>, key: &str, value: u32) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(4u32.to_le_bytes());
        out.extend(value.to_le_bytes());
    }

    #[test]
    fn reads_architecture_and_counts_past_arrays() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        kv_string(&mut b, "general.architecture", "llama");
        // an array of strings, as tokenizer.ggml.tokens is
        let key = "tokenizer.ggml.tokens";
        b.extend((key.len() as u64).to_le_bytes());
        b.extend(key.as_bytes());
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        for t in ["a", "bc"] {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        }
        kv_u32(&mut b, "llama.block_count", 30);
        kv_u32(&mut b, "llama.embedding_length", 576);
        let info = parse(b.as_slice(), b.len() as u64).expect("parse");
        assert_eq!(
            info,
            ModelInfo {
                architecture: "llama".into(),
                block_count: 30,
                embedding_length: Some(576)
            }
        );
    }

    #[test]
    fn rejects_non_gguf() {
        let err = parse(&b"PK\x03\x04rest"[..], 8).expect_err("zip is not gguf");
        assert!(err.to_string().contains("not a GGUF file"), "{err}");
    }

    // --- crafted files: each must be an Err with a message that says what is wrong ---------

    fn header(tensors: u64, kvs: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(tensors.to_le_bytes());
        b.extend(kvs.to_le_bytes());
        b
    }

    fn key(out: &mut Vec<u8>, key: &str, ty: u32) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(ty.to_le_bytes());
    }

    fn minimal(block_count: u32) -> Vec<u8> {
        let mut b = header(0, 2);
        kv_string(&mut b, "general.architecture", "llama");
        kv_u32(&mut b, "llama.block_count", block_count);
        b
    }

    /// Writes `bytes` to a temporary file and reads it the way the agent does.
    fn read_bytes(bytes: &[u8]) -> Result<ModelInfo> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).expect("write crafted gguf");
        read_info(&path)
    }

    fn message(r: Result<ModelInfo>) -> String {
        format!("{:#}", r.expect_err("crafted file must be refused"))
    }

    /// An array whose element type is "array", `depth` levels deep, ending in an empty u32 array:
    /// 12 bytes a level, so 50,000 levels is a 600 KB file.
    fn nested(depth: usize) -> Vec<u8> {
        let mut b = header(0, 3);
        kv_string(&mut b, "general.architecture", "llama");
        key(&mut b, "evil.nested", 9);
        for _ in 1..depth {
            b.extend(9u32.to_le_bytes());
            b.extend(1u64.to_le_bytes());
        }
        b.extend(4u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        kv_u32(&mut b, "llama.block_count", 30);
        b
    }

    #[test]
    fn reads_a_minimal_file_from_disk() {
        let info = read_bytes(&minimal(30)).expect("minimal gguf");
        assert_eq!(info.block_count, 30);
        assert_eq!(info.embedding_length, None);
    }

    #[test]
    fn shallow_nested_arrays_are_skipped() {
        assert_eq!(read_bytes(&nested(3)).expect("3 levels").block_count, 30);
    }

    #[test]
    fn deep_nesting_50k_is_an_error_not_a_stack_overflow() {
        let m = message(read_bytes(&nested(50_000)));
        assert!(m.contains("evil.nested"), "{m}");
        assert!(m.contains("nested deeper than"), "{m}");
    }

    #[test]
    fn deep_nesting_150k_is_an_error_not_a_stack_overflow() {
        let m = message(read_bytes(&nested(150_000)));
        assert!(
            m.contains("evil.nested") && m.contains("nested deeper than"),
            "{m}"
        );
    }

    #[test]
    fn array_size_that_overflows_is_refused() {
        // u64 elements: n * 8 overflows u64.
        let mut b = header(0, 2);
        kv_string(&mut b, "general.architecture", "llama");
        key(&mut b, "evil.array", 9);
        b.extend(10u32.to_le_bytes());
        b.extend((u64::MAX / 4).to_le_bytes());
        let m = message(read_bytes(&b));
        assert!(m.contains("evil.array"), "{m}");
        assert!(m.contains("elements"), "{m}");
    }

    #[test]
    fn counts_larger_than_the_file_are_refused_up_front() {
        let m = message(read_bytes(&header(0, u64::MAX)));
        assert!(m.contains("metadata entries"), "{m}");
        let m = message(read_bytes(&header(u64::MAX, 0)));
        assert!(m.contains("tensors"), "{m}");
        // A million strings claimed, a few bytes present.
        let mut b = header(0, 2);
        kv_string(&mut b, "general.architecture", "llama");
        key(&mut b, "tokenizer.ggml.tokens", 9);
        b.extend(8u32.to_le_bytes());
        b.extend(1_000_000u64.to_le_bytes());
        let m = message(read_bytes(&b));
        assert!(m.contains("tokenizer.ggml.tokens"), "{m}");
        assert!(m.contains("1000000"), "{m}");
        // A key claiming 1 TB.
        let mut b = header(0, 1);
        b.extend((1u64 << 40).to_le_bytes());
        b.extend(b"general.architecture");
        let m = message(read_bytes(&b));
        assert!(m.contains("string of 1099511627776 bytes"), "{m}");
    }

    #[test]
    fn every_truncation_of_a_header_is_an_error_naming_it() {
        let full = minimal(30);
        for cut in 1..full.len() {
            let m = message(read_bytes(&full[..cut]));
            assert!(
                m.contains(&format!("truncated after {cut} bytes")),
                "{cut}: {m}"
            );
        }
    }

    #[test]
    fn empty_file_says_so() {
        let m = message(read_bytes(b""));
        assert!(m.contains("is empty"), "{m}");
    }

    #[test]
    fn a_zip_is_named_as_one() {
        let m = message(read_bytes(
            b"PK\x03\x04\x14\x00\x00\x00 and more of the archive",
        ));
        assert!(m.contains("not a GGUF file"), "{m}");
        assert!(m.contains("zip archive"), "{m}");
    }

    #[test]
    fn a_directory_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = message(read_info(dir.path()));
        assert!(m.contains("is a directory"), "{m}");
    }

    #[test]
    fn block_count_above_u32_is_refused_not_truncated() {
        let mut b = header(0, 2);
        kv_string(&mut b, "general.architecture", "llama");
        key(&mut b, "llama.block_count", 10);
        b.extend(((1u64 << 32) + 30).to_le_bytes());
        let m = message(read_bytes(&b));
        assert!(m.contains("llama.block_count"), "{m}");
        assert!(m.contains("4294967326"), "{m}");
    }

    /// One f32 tensor of `n` elements, followed by `data` bytes of tensor data.
    fn with_tensor(n: u64, data: usize) -> Vec<u8> {
        let mut b = header(1, 2);
        kv_string(&mut b, "general.architecture", "llama");
        kv_u32(&mut b, "llama.block_count", 30);
        b.extend(6u64.to_le_bytes());
        b.extend(b"output");
        b.extend(1u32.to_le_bytes());
        b.extend(n.to_le_bytes());
        b.extend(0u32.to_le_bytes()); // f32
        b.extend(0u64.to_le_bytes());
        b.resize(b.len().next_multiple_of(32), 0);
        b.resize(b.len() + data, 0);
        b
    }

    #[test]
    fn tensor_data_cut_off_is_truncation() {
        assert!(read_bytes(&with_tensor(8, 32)).is_ok());
        let b = with_tensor(8, 31);
        let m = message(read_bytes(&b));
        assert!(
            m.contains(&format!(
                "truncated after {} bytes: tensor `output` ends at byte {}",
                b.len(),
                b.len() + 1
            )),
            "{m}"
        );
        // A shape whose byte size overflows is refused, not wrapped.
        let m = message(read_bytes(&with_tensor(u64::MAX / 2, 0)));
        assert!(
            m.contains("tensor `output`") && m.contains("overflows"),
            "{m}"
        );
    }

    #[test]
    fn negative_block_count_is_refused() {
        let mut b = header(0, 2);
        kv_string(&mut b, "general.architecture", "llama");
        key(&mut b, "llama.block_count", 5);
        b.extend((-1i32).to_le_bytes());
        let m = message(read_bytes(&b));
        assert!(m.contains("llama.block_count") && m.contains("-1"), "{m}");
    }
}
