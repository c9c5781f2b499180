"""`edge-gemma inspect ARTIFACT [--verify] [--json]`: what an artifact holds, and whether its files are intact.

Without `--verify`, sizes are checked (opening the artifact does that); with it, every sha256 is recomputed and a
file that differs from the manifest makes the command fail (exit status 1), naming the file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from edge_gemma.artifact import Artifact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", help="artifact directory")
    parser.add_argument("--verify", action="store_true", help="recompute every file's sha256")
    parser.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def summary(art: Artifact) -> str:
    m = art.manifest
    cfg = (m.get("model") or {}).get("config", {})
    text = cfg.get("text", {})
    q = m.get("quantization") or {}
    recipe = (q.get("recipe") or {})
    schemes: dict[str, int] = {}
    for entry in (q.get("tensors") or {}).values():
        s = entry.get("scheme")
        label = "float" if not s else f"{s.get('kind', s.get('name', '?'))}" + (
            f"-g{s['group_size']}" if isinstance(s, dict) and s.get("group_size") else "")
        schemes[label] = schemes.get(label, 0) + 1
    lines = [
        f"artifact   {art.root}  (schema {m.get('schema_version')})",
        f"model      {m.get('name')}  variant {m.get('variant') or '-'}  {text.get('num_hidden_layers')} layers, "
        f"hidden {text.get('hidden_size')}, vocab {text.get('vocab_size')}, "
        f"vision {'yes' if cfg.get('vision') else 'no'}, audio {'yes' if cfg.get('audio') else 'no'}",
        f"quant      {recipe.get('name', '-')}: {recipe.get('description', '')}",
    ]
    if schemes:
        lines.append("           tensors: " + ", ".join(f"{k} {v}" for k, v in sorted(schemes.items())))
    prefill = m.get("prefill") or {}
    lines.append(f"context    {m.get('context')} positions; prefill chunks {prefill.get('chunk_sizes')} "
                 f"(max {prefill.get('max_chunk')})")
    caches = m.get("caches") or {}
    layers = caches.get("layers", [])
    if layers:
        total = sum(2 * 4 * math.prod(c["k_shape"]) for c in layers)
        lines.append(f"caches     {len(layers)} layers own a KV cache ({_mib(total)} float32): "
                     + ", ".join(f"{c['layer']}:{c['type'].split('_')[0]}{c['k_shape']}" for c in layers))
        if caches.get("shared"):
            lines.append("           shared: " + ", ".join(f"{k}->{v}" for k, v in caches["shared"].items()))
        lines.append(f"           indexing: {caches.get('indexing')}")
    ple = m.get("ple") or {}
    if ple:
        segs = ", ".join(f"{k} {v['dtype']}{v['shape']}@{v['offset']}" for k, v in ple.get("segments", {}).items())
        lines.append(f"ple        {ple.get('file')}: {ple.get('rows')} rows x {ple.get('num_layers')} layers x "
                     f"{ple.get('dim')}; {segs}")
    tok = m.get("tokenizer") or {}
    lines.append(f"tokenizer  {', '.join(tok.get('files', []))}")
    for name, entry in (m.get("backends") or {}).items():
        files = entry.get("files", [])
        files = [f for f in files.values() if f] if isinstance(files, dict) else list(files)
        size = sum(e.size for p, e in art.files.items() if p.startswith(f"{name}/") or p in files)
        lines.append(f"backend    {name}: {len(files)} files, {_mib(size)}"
                     + (f": {', '.join(files)}" if files else ""))
    fid = m.get("fidelity")
    if fid:
        lines.append(f"fidelity   {fid.get('tokens')} held-out tokens vs the eager model on the {fid.get('reference')}:")
        for name, f in fid.get("backends", {}).items():
            lines.append(f"           {name:18s} top-1 {f['top1_agreement'] * 100:.1f}%  KL mean {f['kl_mean']:.4g} "
                         f"max {f['kl_max']:.4g}  ppl {f['ppl_backend']:.4g} (float {f['ppl_reference']:.4g})")
    else:
        lines.append("fidelity   not checked at export")
    total = sum(f.size for f in art.files.values())
    lines.append(f"files      {len(art.files)} files, {_mib(total)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    art = Artifact(args.artifact)
    if args.json:
        print(json.dumps(art.manifest, indent=2, sort_keys=True))
    else:
        print(summary(art))
    if args.verify:
        bad = art.verify()
        if bad:
            for path in bad:
                print(f"edge-gemma inspect: checksum mismatch: {art.root / path} differs from manifest.json",
                      file=sys.stderr)
            print(f"verify: FAILED ({len(bad)} of {len(art.files)} files differ)", file=sys.stderr)
            return 1
        print(f"verify: OK (sha256 of {len(art.files)} files match)", file=sys.stderr if args.json else sys.stdout)
    return 0
