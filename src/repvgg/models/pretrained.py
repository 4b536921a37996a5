"""Published ImageNet weights: which exist (timm's Hugging Face Hub repositories, the official release files), their
published top-1, and loading them by model name, Hub id or local path.

Hub files go through ``huggingface_hub`` and its standard cache (``HF_HUB_CACHE``/``HF_HOME``); with
``HF_HUB_OFFLINE=1`` only the cache is read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import RepVGGError
from .architectures import MODEL_CONFIGS, canonical_name, name_key, registered_name
from .checkpoints import CLASSIFIER_PREFIXES, Checkpoint, check_finite, load_checkpoint, read_checkpoint

__all__ = ["Published", "PUBLISHED", "HUB_FILENAMES", "pretrained_source", "resolve_pretrained", "read_pretrained",
           "load_pretrained", "LoadedPretrained", "imagenet_class_names"]

HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # timm's names, safetensors preferred
OFFICIAL_RELEASE = "the official RepVGG release (github.com/DingXiaoH/RepVGG, Google Drive / Baidu Cloud links)"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar", ".safetensors", ".bin", ".ckpt")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class Published:
    """What the authors published for one architecture: ImageNet-1k top-1 (%) at ``test_size``, and where
    weights are (a Hub repository, else only the official release files)."""

    top1: float | None
    test_size: int = 224
    hub_id: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)

    @property
    def weights(self) -> str:
        """``hub`` (downloadable by name), or ``release file`` (download it yourself, pass its path)."""
        return "hub" if self.hub_id else "release file"


def _timm(name: str) -> str:
    return f"timm/{name}.rvgg_in1k"


# Top-1 from the paper (Table 4) and the official README (D2se and L2pse tested at 320x320); B2g2/B3g2 have
# release files but no published accuracy. timm evaluates D2se at 320 with the whole image (crop_pct 1.0).
PUBLISHED: dict[str, Published] = {
    "repvgg_a0": Published(72.41, hub_id=_timm("repvgg_a0")),
    "repvgg_a1": Published(74.46, hub_id=_timm("repvgg_a1")),
    "repvgg_a2": Published(76.48, hub_id=_timm("repvgg_a2")),
    "repvgg_b0": Published(75.14, hub_id=_timm("repvgg_b0")),
    "repvgg_b1": Published(78.37, hub_id=_timm("repvgg_b1")),
    "repvgg_b1g2": Published(77.78),
    "repvgg_b1g4": Published(77.58, hub_id=_timm("repvgg_b1g4")),
    "repvgg_b2": Published(78.78, hub_id=_timm("repvgg_b2")),
    "repvgg_b2g2": Published(None),
    "repvgg_b2g4": Published(79.38, hub_id=_timm("repvgg_b2g4")),
    "repvgg_b3": Published(80.52, hub_id=_timm("repvgg_b3")),
    "repvgg_b3g2": Published(None),
    "repvgg_b3g4": Published(80.21, hub_id=_timm("repvgg_b3g4")),
    "repvgg_d2se": Published(83.55, 320, _timm("repvgg_d2se"), {"resize": 320, "crop": 320}),
    "repvggplus_l2pse": Published(84.06, 320),
}


def pretrained_source(name: str) -> str | None:
    """The Hugging Face Hub repository holding ``name``'s published weights, or None (official release only)."""
    return PUBLISHED[canonical_name(name)].hub_id


def _hub_source(spec: str) -> str | None:
    """The Hub id ``spec`` names (``hf-hub:`` prefix optional), or None when it reads as a file path."""
    spec = spec.removeprefix("hf-hub:")
    if spec.endswith(_CHECKPOINT_SUFFIXES) or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        return None
    return spec


def _is_model_name(spec: Any) -> bool:
    return isinstance(spec, str) and name_key(spec) in MODEL_CONFIGS


def _published_hub_id(name: str) -> str:
    hub_id = pretrained_source(name)
    if hub_id is None:
        official = MODEL_CONFIGS[canonical_name(name)].official_name
        raise RepVGGError(f"{official} weights are not on the Hugging Face Hub; download {official}-train.pth from "
                          f"{OFFICIAL_RELEASE} and pass its path")
    return hub_id


def resolve_pretrained(spec: bool | str | os.PathLike, name: str | None = None) -> tuple[str, str | None]:
    """(local file or Hub id, registered architecture when known) for ``spec``: True (``name``'s published
    weights), a registered model name, a Hub id such as ``timm/repvgg_a0.rvgg_in1k``, or a checkpoint path."""
    if spec is True:
        if name is None:
            raise RepVGGError("pretrained=True fetches the published weights of a registered architecture, and this "
                              "model is not one: pass a checkpoint path instead")
        return _published_hub_id(name), canonical_name(name)
    if _is_model_name(spec):
        return _published_hub_id(str(spec)), canonical_name(str(spec))
    if not isinstance(spec, str | os.PathLike) or not str(spec).strip():
        raise RepVGGError(f"pretrained must be True, a model name, a Hub id or a file path, got {spec!r}")
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path), None
    hub_id = _hub_source(str(spec))
    if hub_id is None:
        raise RepVGGError(f"pretrained weights not found: {spec} (neither a file nor a Hugging Face Hub id like "
                          f"{pretrained_source('repvgg_a0')})")
    return hub_id, next((k for k, p in PUBLISHED.items() if p.hub_id == hub_id), None)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Keep the Hub client's retry warnings off stderr: a failure ends in one line of ours."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _download(repo_id: str, cache_dir: str | os.PathLike | None) -> str:
    """The first of :data:`HUB_FILENAMES` that the cache or the Hub has, as a local path."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = False  # once the Hub could not be reached, only the cache is asked
    for filename in HUB_FILENAMES:
        try:
            with _quiet_hub():
                return hf_hub_download(repo_id, filename, cache_dir=cache_dir, local_files_only=unreachable)
        except LocalEntryNotFoundError:
            unreachable = True  # neither in the cache nor reachable (offline, or no network)
        except EntryNotFoundError:
            continue  # the repository has no file by that name; try the next
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise RepVGGError(f"no Hugging Face Hub repository {repo_id} (or it is private)") from None
        except (HfHubHTTPError, OSError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RepVGGError(f"cannot download {repo_id} from the Hugging Face Hub: {reason[:200]}") from None
    if unreachable:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise RepVGGError(f"pretrained weights {repo_id} are not in the Hugging Face cache "
                          f"({cache_dir or constants.HF_HUB_CACHE}) and the Hub cannot be reached{offline}; "
                          f"download them once with network access (https://huggingface.co/{repo_id}/resolve/main/"
                          f"{HUB_FILENAMES[0]}), or pass a local file")
    raise RepVGGError(f"{repo_id} on the Hugging Face Hub holds none of {', '.join(HUB_FILENAMES)}")


def read_pretrained(spec: bool | str | os.PathLike, name: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Read the weights ``spec`` names (see :func:`resolve_pretrained`), downloading Hub files into the cache.

    Published weights get their architecture, the preprocessing they were evaluated with and, for a 1000-class
    classifier, the ImageNet-1k class names as metadata."""
    source, arch = resolve_pretrained(spec, name)
    ckpt = read_checkpoint(source if os.path.isfile(source) else _download(source, cache_dir))
    if arch and not ckpt.metadata:
        ckpt.metadata = {"architecture": arch, "preprocess": dict(PUBLISHED[arch].preprocess)}
        head = ckpt.state_dict.get("linear.weight")
        if head is not None and head.shape[0] == len(imagenet_class_names()):
            ckpt.metadata["class_names"] = imagenet_class_names()
    return ckpt


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard index order of published classifiers, as torchvision ships
    them in its weights' metadata (no download)."""
    from torchvision.models import get_weight

    return list(get_weight("ResNet18_Weights.IMAGENET1K_V1").meta["categories"])


@dataclass
class LoadedPretrained:
    """What :func:`load_pretrained` put into a model: the checkpoint read, whether its classifier was kept, and the
    identity branches the weights lack (a first block made stride 1, e.g. for 32x32 images), left freshly made."""

    checkpoint: Checkpoint
    classifier_loaded: bool
    new_identity_branches: list[str]


def _registered_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return registered_name(config) if config is not None else None


def load_pretrained(model: nn.Module, spec: bool | str | os.PathLike | Checkpoint, name: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> LoadedPretrained:
    """Load published or local weights (or a :class:`Checkpoint` already read) into ``model``, strictly; the
    classifier is kept only when its shape fits, else the model keeps its own new head (fine-tuning). Identity
    branches that only the model has (its strides differ) keep their fresh BatchNorm. Weights holding NaN or
    infinity are refused."""
    ckpt = spec if isinstance(spec, Checkpoint) else read_pretrained(spec, name or _registered_name(model), cache_dir)
    check_finite(ckpt)
    own = model.state_dict()
    head = [k for k in ckpt.state_dict if k.startswith(CLASSIFIER_PREFIXES)]
    fits = bool(head) and all(k in own and own[k].shape == ckpt.state_dict[k].shape for k in head)
    fresh = [k for k in own if ".rbr_identity." in k and k not in ckpt.state_dict]
    load_checkpoint(model, {**ckpt.state_dict, **{k: own[k] for k in fresh}}, drop_classifier=not fits)
    branches = sorted({k.split(".rbr_identity.")[0] for k in fresh})
    return LoadedPretrained(ckpt, fits, branches)
