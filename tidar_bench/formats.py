"""Which ecosystem a draft checkpoint comes from, read from what its config.json says.

Drafters for the same algorithm are published in several layouts whose config keys, tensor names and
layer-id meanings differ (docs/checkpoints.md "Draft checkpoint
formats"). The loaders (`baselines/eagle_head.py`, `baselines/dflash_drafter.py`) ask `detect` once and then
read one normalised, flat config (`flat_config`), so every difference is handled in one visible
place and anything unknown is refused by name rather than approximated.

Formats (the strings `detect` returns):
- `safeailab-eagle3`: SafeAILab EAGLE-3 (`LlamaForCausalLMEagle3`, flat, `midlayer.`), and our own heads;
- `specforge-eagle3`: the same layout with `eagle_config.eagle_aux_hidden_state_layer_ids`
  (SGLang/SpecForge): id k = the OUTPUT of target layer k (SGLang captures the input of k + 1);
- `angelslim-eagle3`: Tencent AngelSlim (`Eagle3LlamaForCausalLM`, flat, SafeAILab tensor names);
- `speculators-eagle3` / `speculators-dflash` / `speculators-dspark`: vLLM speculators
  (`speculators_model_type`; nested `transformer_layer_config`); aux id k = the INPUT of target
  layer k (HF `hidden_states[k]`), i.e. our model-core layer k - 1;
- `zlab-dflash`: z-lab DFlash (`DFlashDraftModel` with `dflash_config` or `block_size` at the top).
"""

from __future__ import annotations

from .errors import UserError

EAGLE_FORMATS = ("safeailab-eagle3", "specforge-eagle3", "angelslim-eagle3", "speculators-eagle3")
DFLASH_FORMATS = ("zlab-dflash", "speculators-dflash", "speculators-dspark")
SPECULATORS_TYPES = ("eagle3", "dflash", "dspark")
# Published drafter kinds we know of but do not load: one line naming them instead of a wrong guess.
KNOWN_UNSUPPORTED = {
    "DFlash2DraftModel": "DFlash2 (grouped dynamic convolutions and a candidate selector)",
    "DSparkDraftModel": "DeepSeek dense DSpark (its own embedding and LM head, targets >= 4B)",
    "Qwen3DSparkModel": "DeepSeek dense DSpark (its own embedding and LM head, targets >= 4B)",
}


def detect(raw: dict, path="draft") -> str:
    """The format of a draft checkpoint's config.json (see the module docstring)."""
    arch = (raw.get("architectures") or [""])[0]
    smt = raw.get("speculators_model_type")
    if smt is not None:
        if smt not in SPECULATORS_TYPES:
            raise UserError(f"{path}: speculators_model_type {smt!r} is not supported; supported: "
                            f"{', '.join(SPECULATORS_TYPES)}")
        return f"speculators-{smt}"
    if arch in KNOWN_UNSUPPORTED:
        raise UserError(f"{path}: {arch} ({KNOWN_UNSUPPORTED[arch]}) is not supported")
    if arch == "Eagle3LlamaForCausalLM":
        return "angelslim-eagle3"
    if "eagle_aux_hidden_state_layer_ids" in (raw.get("eagle_config") or {}):
        return "specforge-eagle3"
    if "dflash_config" in raw or arch == "DFlashDraftModel":
        return "zlab-dflash"
    return "safeailab-eagle3"


def flat_config(raw: dict, path="draft") -> tuple[str, dict]:
    """(format, flat config): speculators' `transformer_layer_config` (the layer shape) merged under
    the top-level keys, so the loaders read one dict whatever the ecosystem."""
    fmt = detect(raw, path)
    if not fmt.startswith("speculators-"):
        return fmt, dict(raw)
    layer = raw.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise UserError(f"{path}/config.json: a speculators checkpoint without transformer_layer_config")
    flat = dict(layer)
    flat.update({k: v for k, v in raw.items() if k != "transformer_layer_config"})
    flat["model_type"] = layer.get("model_type", "qwen3")  # the layer's family, not the top level's
    return fmt, flat


def aux_to_model_core(ids, n_target_layers: int, path="draft") -> list[int]:
    """speculators/vLLM aux ids (the input of target layer k = HF hidden_states[k]) -> our
    model-core layer ids (the output of layer k - 1). k = 0 (the embedding) has no model-core layer;
    k = L (after the last layer, which vLLM may read after its final norm) is refused too."""
    out = [int(i) - 1 for i in ids]
    bad = [i + 1 for i in out if not 0 <= i < n_target_layers - 1]
    if bad:
        raise UserError(f"{path}: aux hidden-state layer ids {bad} are not inputs of target layers 1..{n_target_layers - 1}"
                        " (id 0, the embedding output, and the last layer's output are not supported)")
    return out
