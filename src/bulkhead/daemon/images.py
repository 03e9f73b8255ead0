"""The image store: `<state-dir>/images/NAME` (kernels and initrds that `vm create` names), with
`<state-dir>/images/.meta/NAME.json` holding what import recorded (sha256, kind, size, who, when).

`bulkhead image import FILE` (daemon/image_cli.py) copies the file into the store directory under a
staging name `.import-*` (names starting with "." are never image names), then `POST /v1/images` asks the
daemon to adopt it: the daemon opens it without following links, hashes it again (it trusts no client's
digest: a mismatch is 422), validates it with the boot loaders (bulkhead.boot: bzImage, ELF, or PVH ELF;
then the loader's placement check, daemon/integrity.check_boot) unless it is an initrd, and renames it
into place, after the request's audit record is durable (fail closed). Staging needs the state
directory, so import runs on the daemon's host; list and delete work over mTLS from anywhere.

RBAC (docs/RBAC.md): `image/read`, `image/write`, `image/delete` at `/` (images are shared by every
tenant). Deleting an image a VM still names is refused (409). A staged file that cannot be adopted is
a ConfigError / ImageError, answered 422 by the status table (daemon/api_status.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response
from fastapi import Path as PathParam

from bulkhead.control.opsmodels import ImageImport, ImageOut
from bulkhead.daemon.auditlog import now_iso
from bulkhead.daemon.routing import Ctx, router
from bulkhead.daemon.service import NOT_FOUND, ApiError, Core, ReqCtx
from bulkhead.errors import ConfigError, ImageError

__all__ = [
    "META_DIR",
    "STAGING_PREFIX",
    "image_delete",
    "image_import",
    "image_kind",
    "image_list",
    "image_routes",
]

META_DIR = ".meta"
STAGING_PREFIX = ".import-"
_LOCK = threading.Lock()


def image_kind(data: bytes) -> str:
    """"bzImage", "PVH" (an ELF with a PHYS32_ENTRY note) or "ELF", validated by the boot parsers and
    the loader's placement check. Raises ImageError / ConfigError (one sentence) for anything else."""
    from bulkhead.boot.bzimage import is_bzimage, parse_bzimage
    from bulkhead.boot.elf import is_elf, parse_elf
    from bulkhead.boot.pvh import find_pvh_entry
    from bulkhead.errors import ImageError

    if is_elf(data):
        kind = "PVH" if find_pvh_entry(parse_elf(data)) is not None else "ELF"
    elif is_bzimage(data):
        parse_bzimage(data)
        kind = "bzImage"
    else:
        raise ImageError("not a kernel: neither an ELF file nor a bzImage (no 'HdrS' header)")
    from bulkhead.config import MAX_MEM_MIB
    from bulkhead.daemon.integrity import check_boot
    from bulkhead.runtime.config import VmConfig

    check_boot(VmConfig(kernel="import", mem_mib=min(MAX_MEM_MIB, 4096)), data, None)
    return kind


def _meta_path(images: Path, name: str) -> Path:
    return images / META_DIR / f"{name}.json"


def _meta(images: Path, name: str) -> dict[str, Any]:
    try:
        m = json.loads(_meta_path(images, name).read_text())
        return m if isinstance(m, dict) else {}
    except (OSError, ValueError):
        return {}


def image_list(core: Core, ctx: ReqCtx) -> list[dict[str, Any]]:
    core.authorize(ctx, "image/read", "/", visible=lambda: True)
    images: Path = core.paths.images
    out = []
    for p in sorted(images.iterdir()) if images.is_dir() else []:
        if p.name.startswith(".") or not p.is_file() or p.is_symlink():
            continue
        m = _meta(images, p.name)
        out.append({"name": p.name, "kind": m.get("kind", "unknown"), "size": p.stat().st_size,
                    "sha256": m.get("sha256"), "imported": m.get("imported"), "by": m.get("by")})
    return out


def _hash_staged(path: Path, limit: int) -> tuple[bytes, str]:
    """(bytes, sha256) of a staged regular file, opened without following a link. Raises ConfigError
    (it cannot be opened, or is not a regular file) or ImageError (too large)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"the staged file {path.name} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        import stat

        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"the staged file {path.name} is not a regular file")
        if st.st_size > limit:
            raise ImageError(f"the image is larger than {limit >> 20} MiB")
        data = f.read(limit + 1)
    return data, hashlib.sha256(data).hexdigest()


def image_import(core: Core, ctx: ReqCtx, body: Any) -> dict[str, Any]:
    from bulkhead.daemon.integrity import MAX_IMAGE

    core.authorize(ctx, "image/write", "/", visible=lambda: True)
    images: Path = core.paths.images
    staged = images / body.staged
    ctx.detail.update(image=body.name, sha256=body.sha256)
    try:
        data, digest = _hash_staged(staged, MAX_IMAGE)
        if digest != body.sha256:
            raise ConfigError(f"the staged file's sha256 is {digest}, not the {body.sha256} the importer sent")
        if body.initrd:
            kind = "initrd"
        else:
            try:
                kind = image_kind(data)
            except ConfigError as exc:  # ImageError is a ConfigError
                raise ApiError.of(exc, f"{body.name} is not a bootable kernel: {exc}") from None
        ctx.detail["kind"] = kind
        with _LOCK:
            target = images / body.name
            if target.exists():
                raise ApiError(409, f"an image named {body.name!r} already exists; delete it first")
            meta = {"name": body.name, "kind": kind, "size": len(data), "sha256": digest,
                    "imported": now_iso(), "by": ctx.caller.name}
            (images / META_DIR).mkdir(mode=0o700, exist_ok=True)
            tmp = _meta_path(images, body.name).with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, sort_keys=True))
            core.append(ctx.record("201"))  # fail closed: the record is durable before the image appears
            ctx.audited = True
            os.replace(tmp, _meta_path(images, body.name))
            os.replace(staged, target)
            os.chmod(target, 0o600)
    finally:
        with contextlib.suppress(OSError):
            staged.unlink()
    return meta


def _users(core: Core, name: str) -> list[str]:
    out = []
    for r in core.store.q("SELECT name, spec FROM vms"):
        spec = json.loads(r["spec"])
        if name in (spec.get("kernel"), spec.get("initrd")):
            out.append(str(r["name"]))
    return out


def image_delete(core: Core, ctx: ReqCtx, name: str) -> None:
    core.authorize(ctx, "image/delete", "/", visible=lambda: True)
    images: Path = core.paths.images
    ctx.detail["image"] = name
    path = images / name
    if name.startswith(".") or "/" in name or not path.is_file():
        raise ApiError(404, NOT_FOUND)
    users = _users(core, name)
    if users:
        raise ApiError(409, f"image {name!r} is used by VM(s) {', '.join(sorted(users)[:10])}; delete them first")
    with _LOCK:
        core.append(ctx.record("204"))
        ctx.audited = True
        path.unlink(missing_ok=True)
        _meta_path(images, name).unlink(missing_ok=True)


def image_routes(core: Callable[[], Core]) -> APIRouter:
    """/v1/images: list, import (adopt a staged file), delete."""
    r = router()

    @r.get("/images", response_model=list[ImageOut], name="image_list")
    def list_route(ctx: ReqCtx = Ctx) -> Any:
        return image_list(core(), ctx)

    @r.post("/images", response_model=ImageOut, status_code=201, name="image_import",
            summary="adopt a file staged in <state-dir>/images (bulkhead image import)")
    def import_route(body: ImageImport, ctx: ReqCtx = Ctx) -> Any:
        return image_import(core(), ctx, body)

    @r.delete("/images/{name}", status_code=204, name="image_delete", response_model=None)
    def delete_route(name: str = PathParam(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"),
                     ctx: ReqCtx = Ctx) -> Response:
        image_delete(core(), ctx, name)
        return Response(status_code=204)

    return r
