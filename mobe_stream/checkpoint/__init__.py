"""Checkpoint I/O: validated lazy reading, atomic sharded writing, FP8, model-family adapters."""

from .families import FAMILIES, Family, FamilySpec, get_family
from .reader import CheckpointReader, TensorInfo
from .safetensors_io import atomic_write_json, read_header, sha256_file, write_safetensors
from .writer import ShardRecord, ShardWriter, verify_manifest, write_index_and_manifest

__all__ = [
    "FAMILIES", "Family", "FamilySpec", "get_family",
    "CheckpointReader", "TensorInfo",
    "atomic_write_json", "read_header", "sha256_file", "write_safetensors",
    "ShardRecord", "ShardWriter", "verify_manifest", "write_index_and_manifest",
]
