"""The Android demo without the Android SDK (see platform-notes "Android without the SDK").

* `android_demo/core/` (pure Kotlin) is compiled with the JetBrains compiler from npm (`kotlin-compiler`, installed by
  android_demo/tools/install-kotlinc.sh) in ONE kotlinc run for main + tests, cached by content hash under
  .cache/android_demo/, and its JUnit 4 tests run on the installed JDK; all must pass.
* Cross-language: a real tiny LiteRT artifact written by our exporter is validated by the Kotlin manifest reader (as
  the app does, chat template sha256 included), also after `scripts/android_bundle.py` put it into an assets folder;
  the Kotlin tool-call parser gives the same structures as `edge_gemma.chat.parse_response` (the reference) for the
  same model outputs; a WAV written by Kotlin is read back with Python's `wave` and compared with the tone it should
  hold (mathematics, not our output).
* The app's manifest and resources are compiled and linked by aapt2 against Debian's framework-res.apk.
* Static Gradle checks: versions pinned and commented, namespace == applicationId == manifest package, the asset
  names the app reads equal what android_bundle.py writes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tomllib
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest

from paths import REPO  # noqa: E402
DEMO = REPO / "android_demo"
CORE = DEMO / "core"
APP = DEMO / "app"
JUNIT_CP = ["/usr/share/java/junit4.jar", "/usr/share/java/hamcrest-core.jar"]
FRAMEWORK_RES = Path("/usr/share/android-framework-res/framework-res.apk")
CACHE = REPO / ".cache" / "android_demo"

import android_bundle  # noqa: E402

from edge_gemma.artifact import ArtifactWriter, sha256_file  # noqa: E402
from edge_gemma.chat import ToolCallParseError, parse_response  # noqa: E402

# ---------------------------------------------------------------- fixtures: compiler, jar, JUnit run, artifact


@pytest.fixture(scope="session")
def kotlinc() -> Path:
    """The kotlinc launcher; installs the pinned npm kotlin-compiler into .cache/kotlinc when absent (idempotent)."""
    proc = subprocess.run(["bash", str(DEMO / "tools" / "install-kotlinc.sh")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"install-kotlinc.sh failed:\n{proc.stderr}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def core_classpath(kotlinc: Path, tmp_path_factory) -> str:
    """core/ main + tests compiled in one kotlinc run; the jar is reused while sources and compiler are unchanged.
    The session runs on its own copy, so another session replacing the cached jar cannot pull it away."""
    sources = sorted((CORE / "src").rglob("*.kt"))
    h = hashlib.sha256(kotlinc.resolve().parent.parent.joinpath("build.txt").read_bytes())
    for src in sources:
        h.update(src.relative_to(CORE).as_posix().encode() + b"\0" + src.read_bytes() + b"\0")
    jar = CACHE / f"core-{h.hexdigest()[:16]}.jar"
    if not jar.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = jar.with_name(f".{jar.name}.tmp-{os.getpid()}.jar")
        proc = subprocess.run(
            [str(kotlinc), "-nowarn", "-cp", ":".join(JUNIT_CP), "-d", str(tmp),
             str(CORE / "src" / "main" / "kotlin"), str(CORE / "src" / "test" / "kotlin")],
            capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"kotlinc failed:\n{proc.stdout}\n{proc.stderr}"
        os.replace(tmp, jar)
        for stale in CACHE.glob("core-*.jar"):  # jars of earlier sources
            if stale != jar:
                stale.unlink(missing_ok=True)
    mine = tmp_path_factory.mktemp("kotlin") / jar.name
    shutil.copyfile(jar, mine)
    stdlib = kotlinc.resolve().parent.parent / "lib" / "kotlin-stdlib.jar"
    return ":".join([str(mine), str(stdlib), *JUNIT_CP])


def _java(classpath: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["java", "-Xshare:auto", "-cp", classpath, *args], capture_output=True, text=True,
                          timeout=timeout)


def _cross(classpath: str, *args: str) -> None:
    proc = _java(classpath, "org.edgegemma.core.CrossCheckMain", *args)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="session")
def tiny_litert_artifact(embedded_litert_int8_artifact) -> Path:
    """A real artifact with the litert backend (.litertlm included), from our exporter (conftest: built once per
    session, shared with test_litert.py). Tests copy it before changing anything."""
    return embedded_litert_int8_artifact


# ---------------------------------------------------------------- core: JUnit


def test_core_junit_tests_all_pass(core_classpath):
    jar = Path(core_classpath.split(":")[0])
    with zipfile.ZipFile(jar) as z:
        classes = sorted(n[:-len(".class")].replace("/", ".") for n in z.namelist()
                         if n.endswith("Test.class") and "$" not in n)
    assert len(classes) >= 5, classes
    proc = _java(core_classpath, "org.junit.runner.JUnitCore", *classes)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    m = re.search(r"^OK \((\d+) tests?\)", proc.stdout, re.M)
    assert m and int(m.group(1)) >= 30, proc.stdout[-2000:]


# ---------------------------------------------------------------- cross-language: manifest, bundle, parser, WAV


def test_kotlin_validates_the_manifest_our_exporter_writes(core_classpath, tiny_litert_artifact, tmp_path):
    art = tiny_litert_artifact
    manifest = json.loads((art / "manifest.json").read_text())
    litert = manifest["backends"]["litert"]
    bundle = litert["files"]["litertlm"]
    template = manifest["tokenizer"]["chat_template"]
    out = tmp_path / "out.json"
    _cross(core_classpath, "manifest", str(out), str(art))
    [got] = json.loads(out.read_text())
    assert got == {
        "ok": True, "schema_version": manifest["schema_version"], "name": manifest["name"],
        "litertlm": bundle, "litertlm_size": (art / bundle).stat().st_size,
        "litertlm_sha256": sha256_file(art / bundle),
        "model_type": "gemma4", "stop_tokens": litert["litertlm"]["stop_tokens"],
        "start_token": litert["litertlm"]["start_token"], "max_num_tokens": litert["litertlm"]["max_num_tokens"],
        "chat_template": template, "chat_template_sha256": sha256_file(art / template),
        "files": len(manifest["files"]),
        "supports_image": manifest["model"]["config"].get("vision") is not None,
        "supports_audio": manifest["model"]["config"].get("audio") is not None,
    }
    assert got["litertlm"].endswith(".litertlm") and got["stop_tokens"]


def _variant(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.tflite", "ple.bin"))
    m = json.loads((dst / "manifest.json").read_text())
    edit(m, dst)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_kotlin_refuses_bundles_the_app_cannot_run(core_classpath, tiny_litert_artifact, tmp_path):
    art = tiny_litert_artifact

    def schema2(m, d):
        m["schema_version"] = 2

    def onnx_only(m, d):
        m["backends"] = {"onnx": m["backends"]["litert"]}

    def tflite_bundle(m, d):
        m["backends"]["litert"]["files"]["litertlm"] = "litert/decoder.tflite"

    def edited_template(m, d):
        p = d / m["tokenizer"]["chat_template"]
        p.write_text(p.read_text().replace("model", "m0del", 1))

    cases = {
        "schema2": (schema2, "schema_version 2 is not supported by this app (it reads version 1)"),
        "onnx_only": (onnx_only, "backends has no 'litert' entry (found: onnx)"),
        "tflite": (tflite_bundle, "expected a .litertlm file, found 'litert/decoder.tflite'"),
        "template": (edited_template, "differs from the manifest's"),
    }
    dirs = [_variant(art, tmp_path / name, edit) for name, (edit, _) in cases.items()]
    out = tmp_path / "out.json"
    _cross(core_classpath, "manifest", str(out), *map(str, dirs))
    for (name, (_, expected)), got in zip(cases.items(), json.loads(out.read_text())):
        assert got["ok"] is False, (name, got)
        assert expected in got["message"], (name, got["message"])
        assert got["message"].startswith(str(tmp_path / name)), got["message"]  # names the file
    template_sha = sha256_file(tmp_path / "template" / "tokenizer" / "chat_template.jinja")
    assert template_sha in got["message"]


def test_android_bundle_writes_what_the_app_reads(core_classpath, tiny_litert_artifact, tmp_path):
    assets = tmp_path / "assets"
    a = android_bundle.bundle(tiny_litert_artifact, name="tiny", assets=assets)
    b = android_bundle.bundle(tiny_litert_artifact, name="pushed", assets=assets, device=True, link=False)
    again = android_bundle.bundle(tiny_litert_artifact, name="tiny", assets=assets)  # replaces, no duplicate
    assert a == again and a["litertlm_location"] == "assets" and b["litertlm_location"] == "device"
    assert sorted(p.name for p in assets.iterdir()) == sorted([android_bundle.INDEX_FILE, "tiny", "pushed"])
    assert not (assets / b["litertlm"]).exists() and (assets / a["litertlm"]).is_file()
    out = tmp_path / "out.json"
    _cross(core_classpath, "index", str(assets), str(out))
    assert json.loads(out.read_text()) == [
        {"ok": True, "name": "tiny", "location": "assets", "litertlm_in_assets": True},
        {"ok": True, "name": "pushed", "location": "device", "litertlm_in_assets": False},
    ]
    # The app's side: the same index name, read through the constant.
    kt_index = re.search(r'const val INDEX_FILE = "([^"]+)"',
                         (CORE / "src/main/kotlin/org/edgegemma/core/BundleIndex.kt").read_text()).group(1)
    assert kt_index == android_bundle.INDEX_FILE
    assert "BundleIndex.INDEX_FILE" in (APP / "src/main/kotlin/org/edgegemma/demo/BundleLoader.kt").read_text()
    assert android_bundle.DEFAULT_ASSETS == APP / "src" / "main" / "assets"


def test_android_bundle_refuses_an_artifact_without_litert(tmp_path, capsys):
    with ArtifactWriter(tmp_path / "onnx-only") as w:
        w.write_bytes("onnx/decoder.onnx", b"x")
        w.manifest["backends"] = {"onnx": {"files": {"decoder": "onnx/decoder.onnx"}}}
    with pytest.raises(android_bundle.BundleError, match=r"manifest.json: no 'litert' backend \(backends: onnx\)"):
        android_bundle.bundle(tmp_path / "onnx-only", assets=tmp_path / "assets")
    assert not (tmp_path / "assets" / android_bundle.INDEX_FILE).exists()
    assert android_bundle.main([str(tmp_path / "onnx-only"), "--assets", str(tmp_path / "assets")]) == 1
    assert "--backends litert" in capsys.readouterr().err


Q = '<|"|>'
MODEL_OUTPUTS = [
    "Plain answer.<turn|>",
    "  spaced  <eos>",
    f"<|channel>thought\nFirst think.<channel|>Then answer."
    f"<|tool_call>call:get_weather{{city:{Q}Paris, FR{Q},days:3}}<tool_call|><turn|>",
    f"<|tool_call>call:search{{query:{Q}a,b:c}}{Q},limit:10,exact:false,"
    f"filters:{{lang:[{Q}en{Q},{Q}fr{Q}],min:0.5}}}}<tool_call|>",
    "<|tool_call>call:f{a:1_000,b:1e3,c:nan,d:1e400,e:hello world,f:None,g:+7,h:.5,i:1.,j:-0,k:True}<tool_call|>",
    '<|tool_call>call:g{"k": "v\\n\\u00e9", ' + Q + "x y" + Q + ": [1, 2.5, null]}<tool_call|>",
    f"<|tool_call>call:a{{}}<tool_call|><|tool_call>call:b.c-d{{x:{Q}{Q}}}<tool_call|>two calls",
    "<|channel>thought\nunterminated thinking",
    "<|channel>thought\nA<channel|>x<|channel>thought\nB<channel|>y",
    "answer<|tool_response>response:f{x:1}<tool_response|>",
    "<|tool_call>call:f{a:1<tool_call|>",
    f"<|tool_call>call:f{{a:{Q}x}}<tool_call|>",
    "text <|tool_call>call:f{a:1}",
    "<|tool_call>call:f{a:1}}<tool_call|>",
    "<|tool_call>f{a:1}<tool_call|>",
    "<|tool_call>call:f{a:[1,{b:2},[]],c:{}}<tool_call|>",
    "<|tool_call>\n call:f {a : 1 , b : x }\n<tool_call|>",
    '<|tool_call>call:f{a:"unterminated}<tool_call|>',
    "<|tool_call>call:f{a:99999999999999999999999}<tool_call|>",
    "Ünïcödé answer — ok 😀",
]


def _python_structure(text: str):
    try:
        r = parse_response(text)
    except ToolCallParseError:
        return {"error": "ToolCallParseError"}
    return {"answer": r.answer, "thinking": r.thinking,
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in r.tool_calls]}


def _typed(v):
    """Type-strict form for comparison: 1 and 1.0 and True must not compare equal."""
    if isinstance(v, dict):
        return {k: _typed(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_typed(x) for x in v]
    return (type(v).__name__, v)


def test_kotlin_tool_call_parser_matches_python(core_classpath, tmp_path):
    expected = [_python_structure(t) for t in MODEL_OUTPUTS]  # the reference: edge_gemma/chat.py
    assert sum("error" in e for e in expected) >= 5 and sum(bool(e.get("tool_calls")) for e in expected) >= 5
    (tmp_path / "in.json").write_text(json.dumps(MODEL_OUTPUTS))
    _cross(core_classpath, "responses", str(tmp_path / "in.json"), str(tmp_path / "out.json"))
    got = json.loads((tmp_path / "out.json").read_text())
    for text, e, g in zip(MODEL_OUTPUTS, expected, got, strict=True):
        assert _typed(g) == _typed(e), f"{text!r}:\n python {e}\n kotlin {g}"


def test_kotlin_wav_is_a_16k_tone_python_reads_back(core_classpath, tmp_path):
    out = tmp_path / "tone.wav"
    _cross(core_classpath, "wav", str(out))
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 16000)
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2") / 32768.0
    t = np.arange(16000) / 16000
    expected = 0.5 * np.sin(2 * np.pi * 440 * t)  # the 48 kHz tone, band-limited resampling keeps it exact
    assert np.abs(x[1000:15000] - expected[1000:15000]).max() < 2e-3


# ---------------------------------------------------------------- aapt2: manifest and resources


def _catalog() -> dict:
    return tomllib.loads((DEMO / "gradle" / "libs.versions.toml").read_text())


def test_aapt2_compiles_and_links_manifest_and_resources(tmp_path):
    versions = _catalog()["versions"]
    manifest = (APP / "src/main/AndroidManifest.xml").read_text()
    # Debian's aapt2 knows API 29; <uses-native-library> (API 31, LiteRT-LM's optional GPU driver) is the only
    # element it cannot validate, so it is linked without those lines, and nothing else is removed.
    kept = [ln for ln in manifest.splitlines() if "<uses-native-library" not in ln]
    removed = [ln.strip() for ln in manifest.splitlines() if "<uses-native-library" in ln]
    assert removed == ['<uses-native-library android:name="libvndksupport.so" android:required="false" />',
                       '<uses-native-library android:name="libOpenCL.so" android:required="false" />']
    (tmp_path / "AndroidManifest.xml").write_text("\n".join(kept))
    res = tmp_path / "res.zip"
    subprocess.run(["aapt2", "compile", "--dir", str(APP / "src/main/res"), "-o", str(res)], check=True,
                   capture_output=True, text=True)
    proc = subprocess.run(
        ["aapt2", "link", "-I", str(FRAMEWORK_RES), "--manifest", str(tmp_path / "AndroidManifest.xml"),
         "--min-sdk-version", versions["minSdk"], "--target-sdk-version", versions["targetSdk"],
         "-o", str(tmp_path / "app.apk"), "--java", str(tmp_path / "gen"), str(res)],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    badging = subprocess.run(["aapt2", "dump", "badging", str(tmp_path / "app.apk")], capture_output=True, text=True,
                             check=True).stdout
    assert "package: name='org.edgegemma.demo'" in badging
    assert "uses-permission: name='android.permission.RECORD_AUDIO'" in badging
    assert "launchable-activity: name='org.edgegemma.demo.MainActivity'" in badging
    # Every resource the Kotlin code names exists in the R class aapt2 generated.
    r_java = (tmp_path / "gen/org/edgegemma/demo/R.java").read_text()
    defined = set()
    kind = None
    for line in r_java.splitlines():
        if m := re.search(r"public static final class (\w+)", line):
            kind = m.group(1)
        elif m := re.search(r"public static final int (\w+)=", line):
            defined.add((kind, m.group(1)))
    used = set()
    for kt in (APP / "src/main/kotlin").rglob("*.kt"):
        used |= {(m.group(1), m.group(2)) for m in re.finditer(r"(?<![\w.])R\.(\w+)\.(\w+)", kt.read_text())}
    assert used and used <= defined, sorted(used - defined)


# ---------------------------------------------------------------- static Gradle checks


def test_every_catalog_version_is_pinned_and_sourced():
    text = (DEMO / "gradle" / "libs.versions.toml").read_text()
    catalog = _catalog()
    versions = catalog["versions"]
    for key, value in versions.items():
        assert isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)*", value), f"{key} = {value!r} is not pinned"
        # a comment on the line or in the comment block right above it says where the number comes from
        lines = text.splitlines()
        i = next(n for n, ln in enumerate(lines) if re.match(rf"{re.escape(key)}\s*=", ln))
        assert "#" in lines[i] or lines[i - 1].lstrip().startswith("#"), f"{key}: no comment saying where it comes from"
    for section in ("libraries", "plugins"):
        for name, spec in catalog[section].items():
            ref = spec.get("version", {}).get("ref")
            assert ref in versions, f"{section}.{name}: expected a version.ref into [versions], found {spec}"
    # The LiteRT-LM AAR is the release line of the litert-lm-api our exporter uses.
    api = importlib.metadata.version("litert-lm-api")
    assert versions["litertlm"].split(".")[:2] == api.split(".")[:2], (versions["litertlm"], api)
    assert catalog["libraries"]["litertlm-android"]["module"] == "com.google.ai.edge.litertlm:litertlm-android"
    # kotlinc used by CI is the catalog's Kotlin.
    assert f'VERSION="{versions["kotlin"]}"' in (DEMO / "tools" / "install-kotlinc.sh").read_text()
    # No version anywhere else: no coordinates with versions, no dynamic versions, in any Gradle file.
    for f in [*DEMO.glob("*.gradle.kts"), *DEMO.glob("*/build.gradle.kts")]:
        body = f.read_text()
        assert not re.search(r'"[\w.-]+:[\w.-]+:[^"]+"', body), f"{f}: a dependency with an inline version"
        assert not re.search(r'version\s*\(?\s*"', body), f"{f}: a plugin with an inline version"
        assert "+\"" not in body and "latest." not in body, f"{f}: a dynamic version"
    assert "gradle-8.13-bin.zip" in (DEMO / "gradle/wrapper/gradle-wrapper.properties").read_text()


def test_namespace_application_id_and_manifest_package_agree():
    gradle = (APP / "build.gradle.kts").read_text()
    namespace = re.search(r'namespace\s*=\s*"([^"]+)"', gradle).group(1)
    application_id = re.search(r'applicationId\s*=\s*"([^"]+)"', gradle).group(1)
    manifest = (APP / "src/main/AndroidManifest.xml").read_text()
    package = re.search(r'<manifest[^>]*\bpackage="([^"]+)"', manifest).group(1)
    assert namespace == application_id == package == android_bundle.APPLICATION_ID
    for kt in (APP / "src/main/kotlin").rglob("*.kt"):
        assert re.search(rf"^package {re.escape(namespace)}$", kt.read_text(), re.M), kt
        assert kt.parent == APP / "src/main/kotlin" / Path(*namespace.split("."))
    settings = (DEMO / "settings.gradle.kts").read_text()
    assert 'include(":app", ":core")' in settings
    assert "implementation(project(\":core\"))" in gradle
    # core stays pure Kotlin: no Android plugin, no dependency but JUnit for tests.
    core_gradle = (CORE / "build.gradle.kts").read_text()
    assert "android" not in core_gradle.replace("Android", "") and "implementation(" not in core_gradle
    for kt in (CORE / "src").rglob("*.kt"):
        assert not re.search(r"^import (android|androidx|com\.google)\.", kt.read_text(), re.M), kt


def test_bundled_assets_are_not_committed():
    ignore = (DEMO / ".gitignore").read_text().splitlines()
    assert "/app/src/main/assets/" in ignore
