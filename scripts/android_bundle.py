#!/usr/bin/env python3
"""Put an exported artifact into the Android demo app: `make android-bundle ARTIFACT=artifacts/default-int4`.

Copies (hard-links where it can) what the app needs from the artifact into
`android_demo/app/src/main/assets/<name>/`, keeping the artifact's relative paths:

    <name>/manifest.json                  validated by the app (android_demo/core ManifestReader)
    <name>/tokenizer/chat_template.jinja  the app checks its sha256 against the manifest
    <name>/litert/model.litertlm          the LiteRT-LM bundle (left out with --device: too large for an APK)

and adds the bundle to the index the app reads, `assets/edge_gemma_bundles.json` (format in
android_demo/core/.../BundleIndex.kt). The `.tflite` files and `ple.bin` are not copied: LiteRT-LM runs the
`.litertlm` alone (its tokenizer and chat template are inside it). An artifact without the `litert` backend is refused.

With --device the `.litertlm` stays out of the APK; push it once with the adb command this script prints, to
`/sdcard/Android/data/<applicationId>/files/<name>/litert/model.litertlm`.
Everything is written to temporary paths first and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from edge_gemma.artifact import MANIFEST, SCHEMA_VERSION, Artifact, ArtifactError  # noqa: E402

DEFAULT_ASSETS = REPO / "android_demo" / "app" / "src" / "main" / "assets"
INDEX_FILE = "edge_gemma_bundles.json"  # BundleIndex.INDEX_FILE in android_demo/core
INDEX_VERSION = 1
APPLICATION_ID = "org.edgegemma.demo"  # android_demo/app/build.gradle.kts applicationId
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_APK_WARN_BYTES = 1 << 30


class BundleError(ValueError):
    """The artifact cannot be bundled; the message names the file or field and what is wrong."""


def bundle_files(artifact_dir: Path) -> dict[str, str]:
    """Validate the artifact for the app and return {"manifest", "chat_template", "litertlm"} -> relative path."""
    try:
        art = Artifact(artifact_dir)  # schema version, every listed file present with its size
    except ArtifactError as exc:
        raise BundleError(str(exc)) from None
    mpath = artifact_dir / MANIFEST
    backends = art.backends
    if "litert" not in backends:
        found = ", ".join(sorted(backends)) or "none"
        raise BundleError(f"{mpath}: no 'litert' backend (backends: {found}); the Android app runs the LiteRT-LM "
                          f"bundle: re-export with `edge-gemma export ... --backends litert`")
    litertlm = (backends["litert"].get("files") or {}).get("litertlm")
    if not isinstance(litertlm, str) or not litertlm.endswith(".litertlm"):
        raise BundleError(f"{mpath}: backends.litert.files.litertlm: expected a .litertlm path, found {litertlm!r}")
    if litertlm not in art.files:
        raise BundleError(f"{mpath}: backends.litert.files.litertlm {litertlm!r} is not listed in 'files'")
    tok = art.manifest.get("tokenizer") or {}
    template = tok.get("chat_template")
    if not isinstance(template, str) or template not in art.files:
        raise BundleError(f"{mpath}: tokenizer.chat_template: expected a file listed in 'files', found {template!r} "
                          f"(the app checks the bundle's chat template by sha256)")
    try:
        art.check_sha256([litertlm, template])  # what goes into the app is what was exported
    except ArtifactError as exc:
        raise BundleError(str(exc)) from None
    return {"manifest": MANIFEST, "chat_template": template, "litertlm": litertlm}


def _place(src: Path, dst: Path, link: bool) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    shutil.copyfile(src, dst)
    return "copied"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_index(assets: Path) -> dict:
    path = assets / INDEX_FILE
    if not path.is_file():
        return {"index_version": INDEX_VERSION, "bundles": []}
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); delete it and rerun") from None
    if index.get("index_version") != INDEX_VERSION or not isinstance(index.get("bundles"), list):
        raise BundleError(f"{path}: expected index_version {INDEX_VERSION} with a 'bundles' list, "
                          f"found {index.get('index_version')!r}; delete it and rerun")
    return index


def bundle(artifact_dir: str | Path, *, name: str | None = None, assets: str | Path = DEFAULT_ASSETS,
           device: bool = False, link: bool = True) -> dict:
    """Bundle `artifact_dir` into `assets/<name>/` and the index; returns the index entry written."""
    artifact_dir = Path(artifact_dir).resolve()
    assets = Path(assets)
    name = name or artifact_dir.name
    if not _NAME_RE.match(name):
        raise BundleError(f"bundle name {name!r}: expected letters, digits, '.', '_' or '-' (not starting with '.')")
    if name == INDEX_FILE:
        raise BundleError(f"bundle name {name!r} is reserved for the index")
    files = bundle_files(artifact_dir)
    assets.mkdir(parents=True, exist_ok=True)
    index = read_index(assets)

    tmp = assets / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for role, rel in files.items():
            if role == "litertlm" and device:
                continue
            _place(artifact_dir / rel, tmp / rel, link)
        final = assets / name
        if final.exists():
            old = assets / f".{name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    entry = {
        "name": name,
        "manifest": f"{name}/{files['manifest']}",
        "chat_template": f"{name}/{files['chat_template']}",
        "litertlm": f"{name}/{files['litertlm']}",
        "litertlm_location": "device" if device else "assets",
    }
    # A bundle bundled again keeps its place (the app opens the first bundle); a new one goes last.
    names = [b.get("name") for b in index["bundles"]]
    if name in names:
        index["bundles"][names.index(name)] = entry
    else:
        index["bundles"].append(entry)
    _write_json_atomic(assets / INDEX_FILE, index)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", help="an exported artifact directory with the litert backend")
    ap.add_argument("--name", help="bundle name in the app (default: the artifact directory's name)")
    ap.add_argument("--assets", default=str(DEFAULT_ASSETS), help="the app's assets directory")
    ap.add_argument("--device", action="store_true",
                    help="leave the .litertlm out of the APK; push it to the device with adb (printed)")
    ap.add_argument("--copy", action="store_true", help="always copy (default: hard-link when possible)")
    args = ap.parse_args(argv)
    try:
        entry = bundle(args.artifact, name=args.name, assets=args.assets, device=args.device, link=not args.copy)
    except BundleError as exc:
        print(f"android-bundle: {exc}", file=sys.stderr)
        return 1
    assets = Path(args.assets)
    src = Path(args.artifact) / entry["litertlm"].split("/", 1)[1]
    print(f"bundled {args.artifact} as '{entry['name']}' in {assets} (index: {assets / INDEX_FILE})")
    if args.device:
        dst = f"/sdcard/Android/data/{APPLICATION_ID}/files/{entry['litertlm']}"
        print("the .litertlm is not in the APK; after installing the app, push it once:")
        print(f"  adb shell mkdir -p {dst.rsplit('/', 1)[0]}")
        print(f"  adb push {src} {dst}")
    elif src.stat().st_size > _APK_WARN_BYTES:
        print(f"warning: {src} is {src.stat().st_size / 2**30:.1f} GiB; an APK that large installs slowly and "
              f"cannot go to Play; consider --device", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
