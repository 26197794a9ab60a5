"""The AnglE model: a Hugging Face backbone (no LM head) + pooling, and a torch `encode`.

This is the reference the exporter traces and the parity gate compares against.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from angle_rt.batching import pad_batch
from angle_rt.prompts import PROMPTS, resolve_prompt
from angle_rt.tokenizer import TextTokenizer
from angle_torch.billm import apply_billm, check_start
from angle_torch.lora import adapter_base, is_peft_model, merge_lora, save_adapter
from angle_torch.pooling import check_strategy, pool
from angle_torch.settings import ANGLE_CONFIG_FILE, AngleSettings, read_settings

log = logging.getLogger("angle_torch")


class AngleModel(nn.Module):
    """Backbone + pooler: (input_ids, attention_mask) → sentence vectors [B, D]."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, settings: AngleSettings,
                 name: str = "") -> None:
        super().__init__()
        self.backbone = backbone
        self.hf_tokenizer = tokenizer
        self.settings = settings
        self.name = name
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        self._tok: TextTokenizer | None = None
        self.adapter: dict[str, Any] | None = None  # the merged LoRA adapter's report

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        pooling: str | int | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        prompt: str | None = None,
        lora: str | Path | None = None,
        revision: str | None = None,
        attn_implementation: str | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        billm_start: int | None = None,
        load_kwargs: dict[str, Any] | None = None,
    ) -> AngleModel:
        """Load a local directory or hub id; settings saved beside it apply unless overridden.

        `billm_start`: BiLLM/BeLLM, decoder layers ≥ this attend bidirectionally (−1: off;
        default: as saved in angle_config.json). `load_kwargs`: more for
        `AutoModel.from_pretrained` (k-bit training: quantization_config, device_map)."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        name = str(path_or_id)
        if name.startswith("~"):  # `--model=~/m`: the shell expands ~ only at a word's start
            name = str(Path(name).expanduser())
        _check_local(name)
        base = adapter_base(name)  # an adapter directory: weights from its base model
        if base is not None:
            if lora is not None:
                raise ValueError(f"{name} is itself a LoRA adapter; pass its base as the model")
            lora = name
        if revision is not None and Path(base or name).is_dir():  # transformers ignores it
            raise ValueError(f"revision {revision!r} applies to a hub id; {base or name} is a "
                             "local directory (check that revision out there instead)")
        kw = {"revision": revision, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(base or name, **kw)
        adapter = name if base is not None else (str(lora) if lora is not None else None)
        # The adapter's own settings and tokenizer (saved by training beside it) win, whether
        # it is given as the model or as --lora: the two load the same model.
        sources = [base or name, adapter] if adapter else [name]
        tokenizer = AutoTokenizer.from_pretrained(
            adapter if adapter and _has_tokenizer(adapter) else base or name, **kw)
        _check_vocabulary(tokenizer, config, adapter or base or name)
        settings = read_settings(sources, config, tokenizer, revision, pooling is not None)
        _override(settings, pooling, max_length, padding_side, prompt)
        _check_padding(settings, config)
        _check_positions(settings, config)
        _check_encodable(settings, tokenizer)
        if billm_start is not None:
            settings.billm_start = None if billm_start == -1 else billm_start
        if settings.billm_start is not None:
            if not settings.is_decoder:
                raise ValueError(f"BiLLM applies to decoder LLMs; {config.model_type!r} is "
                                 "an encoder (already bidirectional)")
            check_start(settings.billm_start, config.num_hidden_layers)
        config.use_cache = False
        extra = dict(load_kwargs or {})
        with _quiet_transformers(settings.is_decoder):  # the dropped LM head is expected
            backbone = AutoModel.from_pretrained(base or name, config=config, dtype=dtype,
                                                 attn_implementation=attn_implementation,
                                                 **kw, **extra)
        report = None
        if lora is not None:
            backbone, report = merge_lora(backbone, lora)
        if settings.billm_start is not None:
            apply_billm(backbone, settings.billm_start)
        model = cls(backbone.eval(), tokenizer, settings, name)
        model.adapter = report.to_dict() if report else None
        return model

    @property
    def embedding_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def tokenizer(self) -> TextTokenizer:
        """The runtime's tokenization (prompt-keeping truncation), shared with angle_rt."""
        if self._tok is None:
            self._tok = TextTokenizer(self.hf_tokenizer.backend_tokenizer,
                                      self.settings.max_length)
        return self._tok

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return self.pool(out.last_hidden_state, attention_mask)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token states [B, L, D] → sentence vectors [B, D] with this model's pooling."""
        return pool(states, attention_mask, self.settings.pooling, self.settings.padding_side)

    def hidden_states(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's token states: the embedding output, then each layer's (ESE), as
        the model cut after that layer (a depth variant) returns them: a decoder's final
        norm (Llama's `norm`), which Hugging Face applies to the last layer's states only,
        is applied to each (ESE trained other states than the depth-k bundle computes)."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True)
        states = tuple(out.hidden_states)
        norm = getattr(self.backbone, "norm", None)
        if not isinstance(norm, nn.Module) or not hasattr(self.backbone, "layers"):
            return states
        return (*(norm(h) for h in states[:-1]), states[-1])

    def prompt_template(self, prompt: str | None) -> str | None:
        """None → the model's default prompt; '' → none; a name or a literal template."""
        if prompt is None:
            return self.settings.default_prompt
        return resolve_prompt(prompt, {**PROMPTS, **self.settings.prompts})

    @torch.no_grad()
    def encode(self, texts: str | Sequence[str], batch_size: int = 32, prompt: str | None = None,
               normalize: bool = False, device: str | torch.device | None = None,
               show_progress: bool = False) -> np.ndarray:
        """Embed texts in input order, in chunks of `batch_size` (float32 numpy)."""
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        ids = self.tokenizer.encode(texts, self.prompt_template(prompt))
        emb = self.encode_ids(ids, batch_size, device, show_progress)
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        arr = emb.numpy()
        return arr[0] if single else arr

    @torch.no_grad()
    def encode_ids(self, ids: Sequence[Sequence[int]], batch_size: int = 32,
                   device: str | torch.device | None = None, show_progress: bool = False,
                   desc: str = "torch reference") -> torch.Tensor:
        """Vectors of token-id rows (float32, CPU tensor), in input order."""
        device = torch.device(device) if device else next(self.parameters()).device
        self.eval()
        # longest first, so each chunk pads little; results go back to input order
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        chunks = range(0, len(ids), batch_size)
        bar = None
        if show_progress:  # in padded tokens, so the ETA holds though long batches come first
            from tqdm.auto import tqdm
            total = sum(len(ids[order[i]]) * len(order[i:i + batch_size]) for i in chunks)
            bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True)
        emb = torch.empty(len(ids), self.embedding_dim)
        for i in chunks:
            rows = order[i:i + batch_size]
            emb[rows] = self(*self.pad([ids[r] for r in rows], device)).float().cpu()
            if bar is not None:
                bar.update(len(ids[rows[0]]) * len(rows))
        if bar is not None:
            bar.close()
        return emb

    def pad(self, rows: Sequence[Sequence[int]],
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Pad id lists to (input_ids, attention_mask) on the model's padding side."""
        ids, mask = pad_ids(rows, self.pad_token_id, self.settings.padding_side)
        return ids.to(device), mask.to(device)

    def save_pretrained(self, out_dir: str | Path,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """A normal HF directory + angle_config.json that angle-export reads unprompted.
        `state_dict`: this model's weights as given (e.g. gathered from FSDP shards)
        instead of its parameters'."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = None if state_dict is None else {
            k.removeprefix("backbone."): v for k, v in state_dict.items()
            if k.startswith("backbone.")}
        if is_peft_model(self.backbone):  # the adapter only, in angle_emb's layout
            save_adapter(self.backbone, out, causal_lm=self.settings.is_decoder,
                         state_dict=weights)
        else:
            self.backbone.save_pretrained(out, state_dict=weights)
        self.hf_tokenizer.padding_side = self.settings.padding_side
        self.hf_tokenizer.save_pretrained(out)
        cfg = self.settings.to_angle_config(self.name)
        (out / ANGLE_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        if not is_peft_model(self.backbone):
            write_sentence_transformers_files(out, self.settings,
                                              self.backbone.config.hidden_size)
        return out


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int,
            side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → (input_ids, attention_mask) [len(rows), longest], int64: the
    runtime's padding (angle_rt.batching.pad_batch), as torch tensors."""
    ids, mask = pad_batch(rows, pad_id, side)
    return torch.from_numpy(ids), torch.from_numpy(mask)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _check_positions(s: AngleSettings, config: Any) -> None:
    """max_length past the model's position table: its text would fail in the graph (or
    read positions that were never trained), so refused at load, naming the limit."""
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and s.max_length > positions:
        raise ValueError(f"max_length {s.max_length} exceeds the model's "
                         f"max_position_embeddings ({positions}); pass --max-length ≤ "
                         f"{positions}")


def _check_local(name: str) -> None:
    """A path that does not exist: say so (the hub client answered 'Repo id must use
    alphanumeric chars' for ./model, and 'must be in the form namespace/repo_name' for /x/y)."""
    if name.startswith(("/", "./", "../", "~")) or name in (".", ".."):
        path = Path(name).expanduser()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(f"model {name} {what} (a local model is a directory; "
                                    "a hub id is NAMESPACE/NAME)")


def _check_encodable(s: AngleSettings, tokenizer: Any) -> None:
    """Settings under which the runtime would refuse every text (a pooling index past
    max_length; a prompt with two {text} or that fills max_length alone), refused at load:
    the exported bundle opened and then failed each encode."""
    if isinstance(s.pooling, int) and s.pooling >= s.max_length:
        raise ValueError(f"pooling at token {s.pooling} needs texts of ≥ {s.pooling + 1} "
                         f"tokens, past max_length {s.max_length}")
    if s.default_prompt:
        TextTokenizer(tokenizer.backend_tokenizer, s.max_length).encode(
            ["x"], prompt=s.default_prompt)


def _check_vocabulary(tokenizer: Any, config: Any, where: str) -> None:
    """A directory without tokenizer files loads (transformers builds one of its special
    tokens alone), and every word then becomes [UNK]: torch and the bundle agree, so no gate
    catches it. A real tokenizer covers most of the embedding's rows."""
    rows = getattr(config, "vocab_size", None)
    if rows and len(tokenizer) < rows // 2:
        raise ValueError(f"{where}: its tokenizer has {len(tokenizer)} tokens for an embedding "
                         f"of {rows}: no tokenizer files there (tokenizer.json, vocab.txt, "
                         "…)? Save the model's tokenizer beside it")


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _override(s: AngleSettings, pooling, max_length, padding_side, prompt) -> None:
    if pooling is not None:
        s.pooling = check_strategy(pooling)
    if max_length is not None:
        if max_length < 2:
            raise ValueError(f"max_length must be ≥ 2, got {max_length}")
        s.max_length = int(max_length)
    if padding_side is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        s.padding_side = padding_side
    if prompt is not None:
        s.default_prompt = resolve_prompt(prompt, {**PROMPTS, **s.prompts})


# Decoders whose learned position table counts from the first column, pads included (a
# rotary or ALiBi model sees only relative positions; OPT counts from the mask)
ABSOLUTE_POSITION_DECODERS = frozenset({"gpt2"})


def _check_padding(s: AngleSettings, config: Any) -> None:
    # Encoders count positions from the first column, pads included: under left padding a
    # sentence's vector would change with the length of its batch neighbours.
    if s.padding_side == "left" and (not s.is_decoder
                                     or config.model_type in ABSOLUTE_POSITION_DECODERS):
        kind = "decoder" if s.is_decoder else "encoder"
        raise ValueError(f"left padding is not supported for {kind} model "
                         f"{config.model_type!r}: its absolute positions would shift with "
                         "each batch's padding; use padding_side='right'")


# AnglE pooling → sentence-transformers' Pooling mode; cls_avg, cls_max and a token index
# have no Pooling equivalent (ST concatenates modes where AnglE averages them)
ST_POOLING = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
              "avg": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
              "last": "pooling_mode_lasttoken"}


def write_sentence_transformers_files(out: Path, s: AngleSettings, dim: int) -> bool:
    """modules.json, sentence_bert_config.json, 1_Pooling/ (and 2_Normalize/ when the model
    normalizes) so `SentenceTransformer(out)` pools as AnglE does instead of silently
    falling back to mean pooling. False (nothing written, a warning) for a pooling ST
    cannot express, or BiLLM layers (ST runs a decoder causally)."""
    mode = ST_POOLING.get(s.pooling) if isinstance(s.pooling, str) else None
    if mode is None:
        log.warning("pooling %r has no sentence-transformers equivalent: no modules.json "
                    "written (load the model with angle_torch or angle-export)", s.pooling)
        return False
    if s.billm_start is not None:
        log.warning("BiLLM layers (from %d) attend both ways, which sentence-transformers "
                    "does not do: no modules.json written (load the model with angle_torch "
                    "or angle-export)", s.billm_start)
        return False
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if s.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (out / "2_Normalize").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": dim, "include_prompt": True,
               **{m: False for m in ("pooling_mode_cls_token", "pooling_mode_mean_tokens",
                                     "pooling_mode_max_tokens", "pooling_mode_lasttoken",
                                     "pooling_mode_mean_sqrt_len_tokens",
                                     "pooling_mode_weightedmean_tokens")},
               mode: True}
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": s.max_length, "do_lower_case": False}, indent=2) + "\n")
    # AnglE prompts are templates; those that end in {text} are ST's prefix prompts
    prompts = {k: v[: -len("{text}")] for k, v in s.prompts.items() if v.endswith("{text}")}
    default = next((k for k, v in s.prompts.items() if v == s.default_prompt), None)
    (out / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": default if default in prompts else None,
         "similarity_fn_name": "cosine"}, indent=2) + "\n")
    return True
