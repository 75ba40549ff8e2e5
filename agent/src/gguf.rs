//! Just enough of the GGUF format to read a model's architecture, layer count and hidden size
//! from its header, without loading weights: the planner checks prima's layer windows with it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub architecture: String,
    pub block_count: u32,
    pub embedding_length: Option<u32>,
}

pub fn read_info(path: &Path) -> Result<ModelInfo> {
    let f = File::open(path).with_context(|| format!("cannot open model {}", path.display()))?;
    parse(&mut BufReader::new(f))
        .with_context(|| format!("{}: not a readable GGUF file", path.display()))
}

fn parse(r: &mut impl Read) -> Result<ModelInfo> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        bail!("bad magic {magic:?}, expected \"GGUF\"");
    }
    let version = read_u32(r)?;
    if !(2..=3).contains(&version) {
        bail!("GGUF version {version} is not supported (expected 2 or 3)");
    }
    let _tensors = read_u64(r)?;
    let kv_count = read_u64(r)?;
    let mut arch = None;
    let mut ints: Vec<(String, u64)> = Vec::new();
    for _ in 0..kv_count {
        let key = read_string(r)?;
        let ty = read_u32(r)?;
        match ty {
            8 if key == "general.architecture" => arch = Some(read_string(r)?),
            0..=7 | 10..=12 => {
                if let Some(v) = read_scalar(r, ty)? {
                    if key.ends_with(".block_count") || key.ends_with(".embedding_length") {
                        ints.push((key, v));
                    }
                }
            }
            _ => skip_value(r, ty)?,
        }
    }
    let architecture = arch.context("no general.architecture key")?;
    let get = |suffix: &str| {
        let key = format!("{architecture}.{suffix}");
        ints.iter().find(|(k, _)| *k == key).map(|(_, v)| *v as u32)
    };
    let block_count =
        get("block_count").with_context(|| format!("no {architecture}.block_count key"))?;
    Ok(ModelInfo {
        embedding_length: get("embedding_length"),
        architecture,
        block_count,
    })
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_string(r: &mut impl Read) -> Result<String> {
    let len = read_u64(r)?;
    if len > 1 << 20 {
        bail!("string of {len} bytes in metadata");
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b)?;
    Ok(String::from_utf8_lossy(&b).into_owned())
}

/// Integer-like scalars as u64 (None for floats and bools, which are skipped).
fn read_scalar(r: &mut impl Read, ty: u32) -> Result<Option<u64>> {
    let size = scalar_size(ty).context("not a scalar")?;
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..size])?;
    Ok(match ty {
        0 | 2 | 4 | 10 => Some(u64::from_le_bytes(b)),
        1 | 3 | 5 | 11 => Some(u64::from_le_bytes(b)), // signed: only non-negative counts matter
        _ => None,
    })
}

fn scalar_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

fn skip_value(r: &mut impl Read, ty: u32) -> Result<()> {
    match ty {
        8 => {
            read_string(r)?;
        }
        9 => {
            let inner = read_u32(r)?;
            let n = read_u64(r)?;
            if let Some(size) = scalar_size(inner) {
                std::io::copy(&mut r.take(n * size as u64), &mut std::io::sink())?;
            } else {
                for _ in 0..n {
                    skip_value(r, inner)?;
                }
            }
        }
        t => {
            let size = scalar_size(t).with_context(|| format!("unknown metadata type {t}"))?;
            std::io::copy(&mut r.take(size as u64), &mut std::io::sink())?;
        }
    }
    Ok(())
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
        let info = parse(&mut b.as_slice()).expect("parse");
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
        let err = parse(&mut &b"PK\x03\x04rest"[..]).expect_err("zip is not gguf");
        assert!(err.to_string().contains("magic"), "{err}");
    }
}
