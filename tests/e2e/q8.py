"""A Q8_0 copy of a GGUF model, made in seconds with the `gguf` package: prima.cpp's profiler
(Halda) rejects SmolLM2's Q4_1 weights but accepts Q8_0, and a second model file is what tests of
model switching need. Quantised tensors are dequantised and quantised again as Q8_0; float
tensors and all metadata are copied; general.file_type says Q8_0 (7).

    python tests/e2e/q8.py SRC.gguf DST.gguf
"""

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf import quants

FILE_TYPE_Q8_0 = 7


def _field_value(field):
    """A metadata field's value as GGUFWriter takes it."""
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return field.parts[field.data[0]].tolist()[0]


def make_q8(src: Path, dst: Path) -> Path:
    reader = GGUFReader(str(src))
    arch = _field_value(reader.fields["general.architecture"])
    tmp = dst.with_suffix(".tmp")
    writer = GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, FILE_TYPE_Q8_0)
            continue
        kind = field.types[0]
        value = _field_value(field)
        if kind == GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, kind)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type in (Q.F32, Q.F16):
            writer.add_tensor(t.name, np.asarray(t.data).reshape(shape), raw_dtype=t.tensor_type)
            continue
        floats = quants.dequantize(t.data, t.tensor_type).reshape(shape)
        q = quants.quantize(floats.astype(np.float32), Q.Q8_0)
        writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=Q.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


if __name__ == "__main__":
    make_q8(Path(sys.argv[1]), Path(sys.argv[2]))
