"""Checkpoint interop: read any checkpoint (this project's, the original SViTE's, timm's), find out what is really in
it, rebuild the model it holds, and write the compact and export formats.

It depends on ``models`` one way: ``models`` builds and counts networks and knows no file format.
"""
from interop.audit import LayerAudit, audit_layers, audit_warnings, format_audit
from interop.checkpoint_contents import CheckpointContents, read_checkpoint
from interop.compact_checkpoint import is_compact_checkpoint, load_compact, save_compact
from interop.detect import Detection, check_fits, detect
from interop.export import export_message, export_model, load_export, load_sparse, load_sparse_masks, save_sparse
from interop.finetune import load_pretrained
from interop.restore import build_model, describe, load_weights, resolve_tokens, token_summary

__all__ = [
    "CheckpointContents",
    "Detection",
    "LayerAudit",
    "audit_layers",
    "audit_warnings",
    "build_model",
    "check_fits",
    "describe",
    "detect",
    "export_message",
    "export_model",
    "format_audit",
    "is_compact_checkpoint",
    "load_compact",
    "load_export",
    "load_pretrained",
    "load_sparse",
    "load_sparse_masks",
    "load_weights",
    "read_checkpoint",
    "resolve_tokens",
    "save_compact",
    "save_sparse",
    "token_summary",
]
