"""AnglE settings for a model directory: read from what a training run or ST saved.

Precedence: explicit argument > angle_config.json (angle_emb's and ours) >
sentence-transformers files (1_Pooling, sentence_bert_config.json) > defaults.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from angle_torch.pooling import check_strategy

ANGLE_CONFIG_FILE = "angle_config.json"
# a depth variant with weights of its own (training.depth) lives in MODEL/layers-<k>/, its
# angle_config.json holding DEPTH_KEY: {"layers", "of_layers", "teacher", ...}
DEPTH_DIR = "layers-{k}"
DEPTH_KEY = "depth_distilled"
log = logging.getLogger("angle_rt.settings")

# model_type values of decoder-only LLMs (loaded without their LM head)
DECODER_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "olmo", "olmo2",
    "stablelm", "starcoder2", "bloom", "opt", "internlm2", "baichuan", "deepseek_v2", "cohere",
})
_ST_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
}
# sentence-transformers ≥ 5 writes one `pooling_mode` (a name, or a list of them)
_ST_MODES = {"cls": "cls", "mean": "mean", "max": "max", "lasttoken": "last"}


@dataclass
class AngleSettings:
    """How a backbone becomes a sentence encoder."""

    pooling: str | int = "cls"
    max_length: int = 512
    padding_side: str = "right"
    is_decoder: bool = False
    normalize: bool = False  # an ST Normalize module; the exporter's default
    default_prompt: str | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    billm_start: int | None = None  # BiLLM: layers ≥ this attend bidirectionally

    def to_angle_config(self, model_name: str) -> dict[str, Any]:
        """angle_emb-compatible angle_config.json content, plus our extra keys."""
        d = asdict(self)
        start = d.pop("billm_start")
        return {
            "model_name_or_path": model_name,
            "pooling_strategy": d.pop("pooling"),
            "max_length": d.pop("max_length"),
            "tokenizer_padding_side": d.pop("padding_side"),
            "is_llm": d.pop("is_decoder"),
            "apply_billm": start is not None,
            "billm_start_index": start,
            **d,
        }


def is_decoder_config(config: Any) -> bool:
    """True for decoder-only LLM configs."""
    archs = getattr(config, "architectures", None) or []
    return config.model_type in DECODER_MODEL_TYPES or any(
        a.endswith("ForCausalLM") for a in archs)


def read_json(path_or_id: str, filename: str, revision: str | None = None) -> dict | None:
    """A JSON file from a local model directory or the hub cache; None if absent."""
    from transformers.utils import cached_file

    path = cached_file(path_or_id, filename, revision=revision,
                       _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_settings(sources: list[str], config: Any, tokenizer: Any,
                  revision: str | None = None, pooling_given: bool = False) -> AngleSettings:
    """Settings saved beside the model (later sources win), before explicit overrides.

    `sources` is the model, or a base model then an adapter trained on it. With
    `pooling_given`, a sentence-transformers pooling we cannot map is not an error.
    """
    s = AngleSettings(is_decoder=is_decoder_config(config))
    s.max_length = _default_max_length(config, tokenizer)
    s.padding_side = getattr(tokenizer, "padding_side", "right") if s.is_decoder else "right"
    if s.is_decoder:
        s.pooling = "last"
    for source in sources:
        _apply_sentence_transformers(s, source, revision, pooling_given, tokenizer)
        angle = read_json(source, ANGLE_CONFIG_FILE, revision)
        if angle:
            _apply_angle_config(s, angle)
    return s


def _default_max_length(config: Any, tokenizer: Any) -> int:
    limits = [512]
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max < 1_000_000:
        limits.append(tok_max)
    pos = getattr(config, "max_position_embeddings", None)
    if isinstance(pos, int):
        limits.append(pos)
    return min(limits)


def _apply_angle_config(s: AngleSettings, cfg: dict[str, Any]) -> None:
    if cfg.get("pooling_strategy") is not None:
        s.pooling = check_strategy(cfg["pooling_strategy"])
    if cfg.get("max_length"):
        s.max_length = int(cfg["max_length"])
    if cfg.get("tokenizer_padding_side"):
        s.padding_side = cfg["tokenizer_padding_side"]
    if cfg.get("is_llm") is not None:
        s.is_decoder = bool(cfg["is_llm"])
    if cfg.get("apply_billm"):
        # angle_emb keeps the start layer in billm's environment variable, not in the file
        start = cfg.get("billm_start_index")
        if start is None:
            from angle_torch.billm import BILLM_ENV, env_start

            start = env_start()
            log.warning("angle_config.json asks for BiLLM without a start layer: using %s=%d "
                        "(pass billm_start / --billm-start to choose)", BILLM_ENV, start)
        s.billm_start = None if int(start) == -1 else int(start)
    s.normalize = bool(cfg.get("normalize", s.normalize))
    s.default_prompt = cfg.get("default_prompt", s.default_prompt)
    s.prompts.update(cfg.get("prompts") or {})


def _apply_sentence_transformers(s: AngleSettings, path_or_id: str, revision: str | None,
                                 pooling_given: bool, tokenizer: Any = None) -> None:
    modules = read_json(path_or_id, "modules.json", revision)
    if not modules:
        return
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    unsupported = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if unsupported:
        raise ValueError(f"{path_or_id}: sentence-transformers modules {unsupported} have no "
                         "AnglE equivalent (only Transformer, Pooling, Normalize export)")
    s.normalize = "Normalize" in kinds
    pool_cfg = (read_json(path_or_id, f"{kinds['Pooling']}/config.json", revision) or {}
                if "Pooling" in kinds else {})
    if "Pooling" in kinds and not pooling_given:
        s.pooling = _st_pooling(pool_cfg, path_or_id)
    bert_cfg = read_json(path_or_id, "sentence_bert_config.json", revision) or {}
    if bert_cfg.get("max_seq_length"):
        s.max_length = min(s.max_length, int(bert_cfg["max_seq_length"]))
    if bert_cfg.get("do_lower_case"):
        _lowercase_first(tokenizer, path_or_id)
    st_cfg = read_json(path_or_id, "config_sentence_transformers.json", revision) or {}
    s.prompts.update({k: v for k, v in (st_cfg.get("prompts") or {}).items() if v})
    default = st_cfg.get("default_prompt_name")
    if default:
        s.default_prompt = s.prompts.get(default)
    if pool_cfg.get("include_prompt") is False and (s.prompts or s.default_prompt):
        raise ValueError(f"{path_or_id}: its pooling leaves the prompt's tokens out "
                         "(include_prompt: false), which AnglE pooling cannot: every vector "
                         "with a prompt would differ from SentenceTransformer.encode's")


def _lowercase_first(tokenizer: Any, where: str) -> None:
    """sentence-transformers' do_lower_case lowercases each text before tokenizing: a
    Lowercase step ahead of the tokenizer's normalizer does it in every path that
    tokenizes with it (torch, training, the bundle's tokenizer.json)."""
    from tokenizers import normalizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{where}: do_lower_case needs a fast (tokenizer.json) tokenizer")
    current = backend.normalizer
    backend.normalizer = (normalizers.Lowercase() if current is None
                          else normalizers.Sequence([normalizers.Lowercase(), current]))


def _st_pooling(cfg: dict[str, Any], where: str) -> str:
    mode = cfg.get("pooling_mode")
    if mode is not None:  # sentence-transformers ≥ 5
        names = [mode] if isinstance(mode, str) else list(mode)
        if len(names) != 1 or names[0] not in _ST_MODES:
            raise ValueError(f"{where}: sentence-transformers pooling {names} has no single "
                             "AnglE equivalent; pass --pooling explicitly")
        return _ST_MODES[names[0]]
    modes = [name for key, name in _ST_POOLING.items() if cfg.get(key)]
    other = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v
             and k not in _ST_POOLING]
    if not modes and not other:  # no mode named: sentence-transformers pools by mean
        return "mean"
    if len(modes) != 1 or other:
        raise ValueError(f"{where}: sentence-transformers pooling {modes + other} has no single "
                         "AnglE equivalent; pass --pooling explicitly")
    return modes[0]
