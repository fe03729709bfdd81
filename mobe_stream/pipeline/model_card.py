"""The model card (README.md with YAML front matter) of a compact output: what it is, how it was
made, what it costs in error, and the three ways to use it."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint.mobe_format import SOURCE_NAMES


def _base_model(src: Path) -> str:
    """A hub id when the source is a Hugging Face cache snapshot (models--Org--Name), else its name."""
    for part in (src, *src.parents):
        if part.name.startswith("models--"):
            return part.name.removeprefix("models--").replace("--", "/")
    return src.name


def model_card(src: Path, mobe: dict, summary: dict) -> str:
    base = _base_model(src)
    method = mobe.get("method", "mobe")
    layers = summary.get("layers", [])
    front = ["---", f"base_model: {json.dumps(base)}", "library_name: transformers",
             "tags:", "- mobe", "- mixture-of-experts", "- compressed", "- mobe-stream", "---", ""]
    lines = [f"# {Path(str(summary.get('output', 'model'))).name}", "",
             f"`{base}` with its routed experts' gate/up projections compressed by "
             + ("MoBE (Mixture of Basis Experts, arXiv 2508.05257): W_e = A_e act(sum_i softmax(alpha_e)_i B_i), "
                "bases B shared by the experts of a layer (or group)" if method == "mobe" else
                f"the `{method}` low-rank baseline") + ", made with mobe-stream.", "",
             "| setting | value |", "| --- | --- |"]
    for key in ("method", "num_bases", "rank", "groups", "activation", "solver", "init", "steps", "dtype", "layout"):
        if mobe.get(key) is not None:
            lines.append(f"| {key} | {mobe[key]} |")
    lines.append(f"| expert parameters | {summary['expert_params_before']:,} -> {summary['expert_params_after']:,} "
                 f"(-{100 * summary['expert_reduction']:.1f}%) |")
    lines.append(f"| model parameters | {summary['total_params_before']:,} -> {summary['total_params_after']:,} "
                 f"(-{100 * summary['total_reduction']:.1f}%) |")
    lines += ["", "Relative reconstruction error ||W - W_hat|| / ||W|| per compressed layer:", "",
              "| layer | gate_proj | up_proj |", "| --- | --- | --- |"]
    for row in layers:
        cells = [f"{row[p]:.4f}" if isinstance(row.get(p), float) else "-" for p in ("gate_proj", "up_proj")]
        lines.append(f"| {row['layer']} | {cells[0]} | {cells[1]} |")
    lines += ["", "Evaluation: not measured at compression time; compare with the source on your own text:",
              "`mobe-stream eval THIS_DIR --text held_out.txt --reference SOURCE_DIR` (perplexity, KL, top-1 agreement).",
              "", "## Use", "",
              "- mobe-stream's runner (offloaded, any size): `mobe-stream generate THIS_DIR --prompt \"...\"`",
              "- transformers: `AutoModelForCausalLM.from_pretrained(THIS_DIR, trust_remote_code=True)` (the "
              "`modeling_mobe.py` next to this card subclasses transformers' own classes and replaces only the "
              "experts; a plain `from_pretrained` refuses the directory instead of loading random experts)",
              "- vLLM / SGLang / anything that reads the source architecture: `mobe-stream export THIS_DIR --out "
              "FULL_DIR` writes full-size experts again (the saving is lost, the quality is kept)", "",
              f"The source's own card and license are kept as `{SOURCE_NAMES['README.md']}` and "
              f"`{SOURCE_NAMES['LICENSE']}` when it had them; its license applies to these weights."]
    return "\n".join(front + lines) + "\n"
