"""An axolotl training config (YAML) -> the merge it describes, as `axolotl merge-lora config.yml` would run it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .api import MergeResult, merge
from .dtypes import canonical_dtype
from .errors import InputNotFound, MergeError
from .fourbit import DEFAULT_BLOCKSIZE, QUANT_TYPES
from .inputs.quantized import is_quantized
from .names import CONFIG_NAME
from .options import MergeOptions
from .progress import ProgressCallback, ignore_progress

log = logging.getLogger(__name__)

# axolotl writes the merged model here, inside its output_dir.
MERGED_SUBDIR = "merged"


@dataclass(frozen=True)
class AxolotlMerge:
    """The merge an axolotl config describes, command-line overrides applied: what `merge()` takes (base, adapter,
    output) and, through `settings` and `options`, how."""

    base: str
    adapter: str
    output: Path
    dtype: str
    hf_token: str | None = None
    base_quant: str | None = None  # the 4-bit type the config trained on (load_in_4bit / adapter: qlora), or None

    def settings(self, **given: Any) -> dict[str, Any]:
        """The MergeOptions settings of this merge: `given` (a caller's, or the command line's flags, by name) with
        the config's dtype, token and base round trip where `given` has none. The one place the file and its
        overrides meet: a dtype given wins (read_axolotl_config's `dtype` is already in `self.dtype`), a token given
        (not empty) wins over `hf_use_auth_token`, a `base_quant` given ("none" included) wins over the 4-bit
        round trip a QLoRA config calls for."""
        return {
            **given,
            "dtype": given.get("dtype") or self.dtype,
            "hf_token": given.get("hf_token") or self.hf_token,
            "base_quant": given.get("base_quant") or self.base_quant,
        }

    def options(self, options: MergeOptions | None = None, **settings: Any) -> MergeOptions:
        """The MergeOptions of this merge: `options` (or the defaults) with `settings` applied, then the config's
        dtype and token as `settings()` applies them (a token in `options` counts as given)."""
        start = options if options is not None else MergeOptions()
        given = {"hf_token": start.hf_token, "base_quant": start.base_quant, **settings}
        return MergeOptions.from_settings(start, self.settings(**given))


def read_axolotl_config(
    config: str | Path | Mapping[str, Any],
    *,
    base: str | None = None,
    adapter: str | None = None,
    output_dir: str | Path | None = None,
    output: str | Path | None = None,
    dtype: str | None = None,
    base_quant: str | None = None,
) -> AxolotlMerge:
    """Read the keys of an axolotl config (a YAML path or the parsed mapping) that a merge needs; every other key
    (axolotl configs have hundreds: datasets, lora_r, learning_rate ...) is ignored. Each keyword, when given,
    overrides the file as axolotl's `--key value` flags do.

    - `base_model` (with `revision_of_model`, if set) is the base; `base_model_config`, if it names another
      place, is reported: the base's own config.json is the one read.
    - `lora_model_dir` is the adapter, else `output_dir` (where training saved it).
    - The output is `{output_dir}/merged/`, as axolotl writes it.
    - The dtype is `torch_dtype` if set, else bf16 for `bf16: true` or `bf16: auto` (the merge needs no GPU to
      support it), f16 for `fp16`/`float16`/`load_in_8bit`, else f32, as axolotl loads the model for its merge.
    - `hf_use_auth_token`: a string is the token; true/false change nothing (HF_TOKEN or the stored login is used).
    - `load_in_4bit: true` or `adapter: qlora`: the base is merged as QLoRA trained on it, each weight round-tripped
      through 4-bit (`base_quant`), as `axolotl merge-lora` does (see `_base_quant`); not when the base is
      quantized already (its config.json, read where no download is needed, says so). A 4-bit setting the round
      trip cannot reproduce (no double quantization, another blocksize) is a MergeError unless `base_quant` is
      given. `load_in_8bit` changes nothing: axolotl merges an 8-bit LoRA into the weights as stored.

    Relative paths are relative to the working directory, as axolotl reads them. Raises MergeError naming the file
    and the key when a required key is missing or has the wrong type.
    """
    source, values = _load(config)
    base_ref = base or _base(source, values)
    output_dir = output_dir if output_dir is not None else _path(source, values, "output_dir")
    adapter_ref = adapter or _path(source, values, "lora_model_dir") or output_dir
    if adapter_ref is None or (output is None and output_dir is None):
        _path(source, values, "output_dir", required=True)  # raises: it was needed and is missing
    output_path = Path(output) if output is not None else Path(str(output_dir)) / MERGED_SUBDIR
    config_dir = values.get("base_model_config")
    if config_dir is not None and str(config_dir) != base_ref.split("@")[0]:
        log.warning(
            "%s: base_model_config %r differs from base_model %r; the config.json of the base is the one read",
            source,
            config_dir,
            base_ref,
        )
    token = values.get("hf_use_auth_token")
    if base_quant is None:
        base_quant = _config_base_quant(source, values, base_ref)
    return AxolotlMerge(
        base=base_ref,
        adapter=str(adapter_ref),
        output=output_path,
        dtype=canonical_dtype(dtype) if dtype else _dtype(source, values),
        hf_token=token if isinstance(token, str) and token else None,
        base_quant=base_quant,
    )


def _load(config: str | Path | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(config, Mapping):
        return "axolotl config", config
    path = Path(config)
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise InputNotFound(f"{path}: axolotl config not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path}: cannot read the axolotl config ({exc})") from exc
    values = _yaml(text, path)
    if not isinstance(values, dict):
        raise MergeError(f"{path}: expected a YAML mapping of axolotl settings, got {type(values).__name__}")
    return str(path), values


# Nodes a config may hold once its aliases are expanded: axolotl configs have hundreds; a few hundred bytes of
# aliases nested in aliases (a "billion laughs") expand to billions, which printing one value would spell out.
MAX_YAML_NODES = 100_000


def _yaml(text: str, path: Path) -> Any:
    """yaml.safe_load, refusing documents whose aliases expand past MAX_YAML_NODES (or refer to themselves)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise MergeError(
                f"{path}: its YAML aliases expand to over {MAX_YAML_NODES:,} values (or refer to themselves); "
                "an axolotl config needs neither"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise MergeError(f"{path}: not valid YAML ({' '.join(str(exc).split())[:200]})") from exc
    except RecursionError as exc:
        raise MergeError(f"{path}: not valid YAML (nested too deeply)") from exc
    finally:
        loader.dispose()


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes the document has with every alias expanded (capped past the limit), without expanding it:
    each node's size is computed once, bottom up; a node inside itself counts as too large."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children), MAX_YAML_NODES + 1)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            return MAX_YAML_NODES + 1
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _short(value: Any, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."


def _base(source: str, values: Mapping[str, Any]) -> str:
    base = _path(source, values, "base_model", required=True)
    revision = values.get("revision_of_model")
    if revision is None or "@" in base:
        return base
    if not isinstance(revision, str) or not revision:
        raise MergeError(f"{source}: 'revision_of_model' must be a branch, tag or commit, got {_short(revision)}")
    return f"{base}@{revision}"


def _path(source: str, values: Mapping[str, Any], key: str, required: bool = False) -> str | None:
    value = values.get(key)
    if value is None or value == "":
        if required:
            raise MergeError(f"{source}: '{key}' is missing (needed to merge; or pass it on the command line)")
        return None
    if not isinstance(value, str | Path):
        raise MergeError(f"{source}: '{key}' must be a path or repo id, got {_short(value)}")
    return str(value)


def _dtype(source: str, values: Mapping[str, Any]) -> str:
    torch_dtype = values.get("torch_dtype")
    if torch_dtype is not None and torch_dtype != "auto":
        try:
            return canonical_dtype(str(torch_dtype))
        except MergeError:
            raise MergeError(
                f"{source}: 'torch_dtype' {_short(torch_dtype)} is not one of bfloat16, float16, float32"
            ) from None
    if values.get("bf16") in (True, "auto") or values.get("bfloat16") is True:
        return "bf16"
    if values.get("fp16") is True or values.get("float16") is True or values.get("load_in_8bit") is True:
        return "f16"
    return "f32"


def _config_base_quant(source: str, values: Mapping[str, Any], base: str) -> str | None:
    """The round trip the config calls for (`_base_quant`), unless the base is quantized already: then it is the
    4-bit model training used, merged into as it is."""
    base_quant = _base_quant(source, values)
    if base_quant is not None and _known_quantized(base):
        log.info("%s: the base %s is quantized already: it is merged into as it is, not round-tripped", source, base)
        return None
    return base_quant


def _base_quant(source: str, values: Mapping[str, Any]) -> str | None:
    """The 4-bit type a QLoRA config trained on, which the merge round-trips the base through; None for any other
    config.

    axolotl's merge (`cli/merge_lora.py`, `_do_merge_lora_efficient`) simulates the 4-bit base when the config has
    `load_in_4bit` or `adapter: qlora`, with double quantization unless `bnb_4bit_use_double_quant` (in
    `bnb_config_kwargs` or at the top) is false, in blocks of `bnb_config_kwargs.blocksize` or 64, always nf4.
    Training quantizes with `bnb_config_kwargs.bnb_4bit_quant_type` (nf4 by default, `loaders/model.py`): that
    type is taken here, so an fp4-trained adapter merges into the fp4 base it saw. Settings the round trip cannot
    reproduce (no double quantization, another blocksize or type) are refused, naming --base-quant."""
    if values.get("load_in_4bit") is not True and values.get("adapter") != "qlora":
        return None
    kwargs = values.get("bnb_config_kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise MergeError(f"{source}: 'bnb_config_kwargs' must be a mapping, got {_short(kwargs)}")
    quant_type = kwargs.get("bnb_4bit_quant_type", values.get("bnb_4bit_quant_type")) or "nf4"
    double = kwargs.get("bnb_4bit_use_double_quant", values.get("bnb_4bit_use_double_quant"))
    blocksize = kwargs.get("blocksize")
    unsupported = None
    if quant_type not in QUANT_TYPES:
        unsupported = f"'bnb_4bit_quant_type' {_short(quant_type)} is not nf4 or fp4"
    elif double is False:
        unsupported = "'bnb_4bit_use_double_quant: false'"
    elif blocksize is not None and blocksize != DEFAULT_BLOCKSIZE:
        unsupported = f"'blocksize: {_short(blocksize)}'"
    if unsupported is not None:
        raise MergeError(
            f"{source}: {unsupported}: the 4-bit base QLoRA trained on is reproduced as nf4 or fp4 with double "
            f"quantization in blocks of {DEFAULT_BLOCKSIZE} only; pass --base-quant none to merge into the weights "
            "as stored, or --base-quant nf4|fp4"
        )
    return str(quant_type)


def _known_quantized(base: str) -> bool:
    """Whether the base's config.json, where it can be read without a download (a local directory, or the hub
    cache), names a quantization. Anything unreadable counts as not: the merge reads it and says what is wrong."""
    path = Path(base).expanduser()
    try:
        if path.is_dir():
            config_path: object = path / CONFIG_NAME
        else:
            from huggingface_hub import try_to_load_from_cache

            repo_id, _, revision = base.partition("@")
            config_path = try_to_load_from_cache(repo_id, CONFIG_NAME, revision=revision or None)
        if not isinstance(config_path, str | Path):
            return False
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and is_quantized(config)


# read_axolotl_config's keywords: merge_from_axolotl passes these on to it, and the rest to the MergeOptions.
# `base_quant` is also a MergeOptions field: given, it settles the config's 4-bit settings, so it goes to both.
OVERRIDES = ("base", "adapter", "output_dir", "output", "dtype", "base_quant")


def merge_from_axolotl(
    config: str | Path | Mapping[str, Any],
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback = ignore_progress,
    **settings: Any,
) -> MergeResult:
    """`axolotl merge-lora config.yml`, streaming: merge the adapter an axolotl config trained into its base and
    write `{output_dir}/merged/`. `config` is the YAML's path or its parsed mapping; the keywords `base`, `adapter`,
    `output_dir`, `output`, `dtype` and `base_quant` (also taken from `options`) override it (see
    `read_axolotl_config`); `options` and the other `settings` are `merge()`'s (max_shard_size, overwrite, checksum,
    hf_token ...), with the config's dtype, token and base round trip applied as `AxolotlMerge.options` applies
    them."""
    overrides = {key: settings.pop(key) for key in OVERRIDES if key in settings}
    if options is not None and options.base_quant is not None:
        overrides.setdefault("base_quant", options.base_quant)
    found = read_axolotl_config(config, **overrides)
    return merge(found.base, found.adapter, found.output, found.options(options, **settings), progress=progress)
