"""Model names: a local path, or a Hugging Face Hub id fetched (or found in the cache) by ``huggingface_hub``.

Every place hetvae reads a model (``model.init_from``, :func:`hetvae.load_autoencoder`,
:func:`hetvae.predictor.load_predictor`, :func:`hetvae.attach_log_scale_head`,
``AutoencoderKL.from_pretrained``) takes a name in one of these forms:

- an existing local file or folder: itself; a local path always wins;
- ``org/name``: a Hub model repository (a repository id has exactly two parts);
- ``org/name/sub/folder``: a folder in it, e.g. a pipeline repository's ``vae``;
- ``org/name/path/file.safetensors``: one file in it (``.safetensors``, ``.ckpt``, ``.pt``, ``.pth``,
  ``.bin``), e.g. an SD single-file VAE;
- any of them followed by ``@revision``: a branch, tag or commit (``org/name@main``,
  ``org/name/vae@refs/pr/3``).

Only a ``str`` can be a Hub id; a ``pathlib.Path`` is always a local path, and so is a string that
starts with ``/``, ``./``, ``../`` or ``~``. From a repository only what a VAE needs is fetched:
its ``config.json`` and weights (``diffusion_pytorch_model.safetensors``, the ``.bin`` only when
there is no safetensors file; ``variant="fp16"`` fetches ``diffusion_pytorch_model.fp16.*`` as
diffusers does), a hetvae or ldm export's ``model.safetensors`` / ``vae.safetensors``, and a
hetvae head file beside them. ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) reads the cache
only; ``HF_HUB_CACHE`` / ``HF_HOME`` choose the cache, as for every ``huggingface_hub`` user.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# one part of a repository id: letters, digits, '-', '_', '.'; no '--' or '..'; not starting or
# ending with '-' or '.'; at most 96 characters (the Hub's rule)
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_PATH_PART = re.compile(r"[^\\:*?\"<>|\0]+")
_LOCAL_PREFIXES = ("/", "./", "../", "~", "\\")
_VARIANT = re.compile(r"[A-Za-z0-9_-]+")
_DIFFUSERS_STEM = "diffusion_pytorch_model"
_HEAD_FILE = "log_scale_head.safetensors"

FORMS = (
    "a local file or folder, or a Hugging Face Hub id: 'org/name', 'org/name/sub/folder' (e.g. a pipeline's "
    "'org/name/vae'), 'org/name/path/file.safetensors' (one file), each optionally followed by '@revision'"
)


@dataclass(frozen=True)
class HubName:
    """A parsed Hub id: ``repo_id`` (``org/name``), ``path`` inside the repository ('' for its root),
    whether that path is one file, and the ``revision`` (None: ``main``)."""

    repo_id: str
    path: str = ""
    is_file: bool = False
    revision: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"/{self.path}" if self.path else "")
        return text + (f"@{self.revision}" if self.revision is not None else "")


def parse_hub_name(name: str) -> HubName | None:
    """The :class:`HubName` a string spells, or None when it is not a Hub id (module docstring)."""
    if not isinstance(name, str) or not name or name.startswith(_LOCAL_PREFIXES) or "\\" in name:
        return None
    text, at, revision = name.partition("@")
    if at and not revision.strip():
        return None
    parts = text.split("/")
    if len(parts) < 2 or not all(_REPO_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts[:2]):
        return None
    rest = parts[2:]
    if any(not _PATH_PART.fullmatch(p) or p in (".", "..") for p in rest):
        return None
    path = "/".join(rest)
    is_file = bool(rest) and rest[-1].lower().endswith(MODEL_FILE_SUFFIXES)
    return HubName("/".join(parts[:2]), path, is_file, revision if at else None)


def is_hub_id(name: object) -> bool:
    """Whether ``name`` is a string that names a Hub repository, folder or file and no local path
    exists under that name (what :func:`resolve_model` would fetch)."""
    return isinstance(name, str) and not Path(name).expanduser().exists() and parse_hub_name(name) is not None


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def resolve_model(
    name: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
) -> Path:
    """The local path of the model ``name`` names (module docstring), fetched from the Hub if need be.

    ``subfolder``: a folder inside the model (diffusers' argument, e.g. ``"vae"``), after any folder
    the name spells. ``revision``: a branch, tag or commit of a Hub repository (the same as an
    ``@revision`` suffix; both given must agree). ``variant``: fetch
    ``diffusion_pytorch_model.<variant>.safetensors`` (else ``.bin``) rather than the plain weights;
    for a local path it is left to the loader. ``cache_dir``, ``token``, ``force_download``,
    ``local_files_only``: as for ``huggingface_hub.snapshot_download`` (only used for a Hub id).

    Raises:
        FileNotFoundError: no such local path and ``name`` is not a Hub id (the message lists the
            forms accepted); the repository, revision, folder or file does not exist on the Hub; or
            the Hub is not to be reached (``HF_HUB_OFFLINE=1``, ``local_files_only``, no network) and
            the cache does not hold it (the message names the cache folder and the ``hf download``
            command that fetches it).
        ValueError: a ``revision`` for a local path, two revisions that differ, a ``variant`` for
            a single file, a malformed ``subfolder``, ``revision`` or ``variant``.
        TypeError: ``name`` is neither a string nor a path.
        ImportError: a Hub id without ``huggingface_hub`` installed.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"a model is named by a str or a path, got {type(name).__name__}: {FORMS}")
    if variant is not None and not (isinstance(variant, str) and _VARIANT.fullmatch(variant)):
        raise ValueError(f"variant must be None or a name of letters, digits, '_' and '-' (e.g. 'fp16'), got {variant!r}")
    if subfolder is not None and (not isinstance(subfolder, str) or subfolder.startswith(_LOCAL_PREFIXES)
                                  or ".." in subfolder.split("/")):
        raise ValueError(f"subfolder must be a relative folder name such as 'vae', got {subfolder!r}")
    if revision is not None and not (isinstance(revision, str) and revision.strip()):
        raise ValueError(f"revision must be a branch, tag or commit name, got {revision!r}")
    local = Path(name).expanduser()
    if local.exists():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} chooses a revision of a Hub repository, but {name} is a local path: leave it out"
            )
        if subfolder:
            local = local / subfolder
            if not local.exists():
                raise FileNotFoundError(f"{local}: no such file or directory (subfolder {subfolder!r} of {name})")
        return local
    hub = parse_hub_name(name) if isinstance(name, str) else None
    if hub is None:
        if isinstance(name, str) and name.count("/") >= 1 and not name.startswith(_LOCAL_PREFIXES):
            raise FileNotFoundError(f"{name}: no such file or directory, nor a Hub id; a model is named by {FORMS}")
        raise FileNotFoundError(f"{name}: no such file or directory")
    if revision is not None and hub.revision is not None and revision != hub.revision:
        raise ValueError(f"{name} names revision {hub.revision!r} but revision={revision!r} was given: give one")
    if hub.is_file and subfolder:
        raise ValueError(f"{name} names one file; subfolder={subfolder!r} applies to a folder")
    if hub.is_file and variant is not None:
        raise ValueError(f"variant applies to a diffusers folder's weights; {name} names one file: leave variant out")
    hub = HubName(hub.repo_id, _join(hub.path, subfolder), hub.is_file, revision or hub.revision)
    options = {"cache_dir": cache_dir, "token": token, "force_download": force_download,
               "local_files_only": local_files_only}
    return _fetch(hub, variant, options)


def _weights(prefix: str, variant: str | None, suffix: str) -> str:
    return f"{prefix}{_DIFFUSERS_STEM}{f'.{variant}' if variant else ''}{suffix}"


def _patterns(hub: HubName, variant: str | None, suffix: str) -> list[str]:
    """The files of the repository that a VAE at ``hub`` needs, with weights ending in ``suffix``."""
    if hub.is_file:
        folder, _, file = hub.path.rpartition("/")
        prefix = f"{folder}/" if folder else ""
        stem = file.rsplit(".", 1)[0]
        extra = [f"{prefix}config.json"] if file == _HEAD_FILE else [f"{prefix}{stem}.{_HEAD_FILE}"]
        return [hub.path, *extra]
    prefixes = [f"{hub.path}/" if hub.path else ""]
    if not hub.path:  # a pipeline repository's VAE is in vae/, where the loader looks too
        prefixes.append("vae/")
    return [f"{p}{n}" for p in prefixes for n in (
        "config.json", _weights("", variant, suffix), _HEAD_FILE, "model.safetensors", "vae.safetensors",
        f"vae.{_HEAD_FILE}",
    )]


def _has_model(folder: Path, variant: str | None) -> bool:
    """Whether ``folder`` (or its ``vae/``) holds a model the loader reads with ``variant``."""
    for f in (folder, folder / "vae"):
        if (f / "model.safetensors").is_file() or (f / "vae.safetensors").is_file():
            return True
        if (f / "config.json").is_file() and any((f / _weights("", variant, s)).is_file() for s in (".safetensors", ".bin")):
            return True
    return False


def _download_hint(hub: HubName, variant: str | None) -> str:
    if hub.is_file:
        what = f" {hub.path}"
    elif hub.path:
        what = f' --include "{hub.path}/*"'
    else:
        what = f" config.json {_weights('', variant, '.safetensors')}"
    return f"hf download {hub.repo_id}{what}" + (f" --revision {hub.revision}" if hub.revision else "")


def _fetch(hub: HubName, variant: str | None, options: dict) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:
        raise ImportError(f"{hub}: reading a Hugging Face Hub id needs huggingface_hub (pip install huggingface_hub)") from e
    offline = bool(constants.HF_HUB_OFFLINE or options["local_files_only"])
    cache = Path(options["cache_dir"] or constants.HF_HUB_CACHE)
    revision = hub.revision or "main"

    def not_cached(detail: str = "") -> FileNotFoundError:
        why = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else (
            "local_files_only=True" if options["local_files_only"] else "the Hub could not be reached")
        pipeline = "" if hub.path else f" (a pipeline repository: name its VAE folder, {hub.repo_id}/vae)"
        return FileNotFoundError(
            f"{hub}: not in the Hugging Face cache {cache}{detail} ({why}); fetch it while online with "
            f"`{_download_hint(hub, variant)}{f' --cache-dir {cache}' if options['cache_dir'] else ''}`{pipeline}, or go online (unset HF_HUB_OFFLINE) and hetvae fetches it"
        )

    def download(suffix: str) -> Path:
        try:
            return Path(huggingface_hub.snapshot_download(
                hub.repo_id, revision=hub.revision, allow_patterns=_patterns(hub, variant, suffix), **options))
        except GatedRepoError:
            raise FileNotFoundError(
                f"{hub}: {hub.repo_id} is a gated Hub repository: accept its terms on https://huggingface.co/"
                f"{hub.repo_id} and log in (`hf auth login`)") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(
                f"{hub}: no such local file or folder, and no Hugging Face Hub repository {hub.repo_id!r} (or it is "
                f"private: log in with `hf auth login`); a model is named by {FORMS}") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"{hub}: the Hub repository {hub.repo_id} has no revision {revision!r}") from None
        except LocalEntryNotFoundError:
            raise not_cached() from None
        except HfHubHTTPError as e:
            raise FileNotFoundError(f"{hub}: the Hub refused the download ({e})") from None

    def missing(what: str) -> FileNotFoundError:
        if offline:
            return not_cached(f" ({what} is not cached)")
        try:
            files = huggingface_hub.list_repo_files(hub.repo_id, revision=hub.revision, token=options["token"])
        except Exception as e:  # noqa: BLE001 - only for the message: the files cannot be listed
            return not_cached(f" ({what} is not cached; listing the repository failed: {type(e).__name__})")
        shown = ", ".join(sorted(files)[:20]) + (f", ... ({len(files) - 20} more)" if len(files) > 20 else "")
        return FileNotFoundError(f"{hub}: the Hub repository {hub.repo_id} (revision {revision!r}) has no {what}; "
                                 f"its files: {shown}")

    snapshot = download(".safetensors")
    target = snapshot / hub.path if hub.path else snapshot
    if hub.is_file:
        if not target.is_file():
            raise missing(f"file {hub.path!r}")
        return target
    if not _has_model(target, variant):
        snapshot = download(".bin")  # diffusers' order: .safetensors, else .bin
        target = snapshot / hub.path if hub.path else snapshot
    if not _has_model(target, variant):
        weights = " or ".join(_weights("", variant, s) for s in (".safetensors", ".bin"))
        where = f"folder {hub.path!r}" if hub.path else "root (nor vae/)"
        raise missing(f"VAE in its {where}: config.json with {weights}, model.safetensors or vae.safetensors")
    return target
