"""The user-facing commands on the embedded checkpoint through the eager reference backend (no artifact needed),
and `bench --budget` verdicts on injected timings. The same commands on an exported artifact are in
test_export_build.py."""

from __future__ import annotations

import json
import re

import pytest

from artifact_builder import cli


@pytest.fixture(scope="module")
def eager_answer():
    from edge_gemma import api

    with api.open_checkpoint("default", context=256) as m:
        return "".join(m.generate("Return the absolute value.", max_new_tokens=6))


def test_commands_are_registered():
    r = cli("--help")
    assert r.returncode == 0
    for name in ("export", "run", "chat", "inspect", "bench"):
        assert name in r.stdout


def test_run_streams_only_the_answer(eager_answer):
    r = cli("run", "default", "--context", "256", "--prompt", "Return the absolute value.", "--max-new-tokens", "6",
            "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == eager_answer + "\n"  # the answer and nothing else; timings went to stderr
    assert "[eager]" in r.stderr and "tok/s" in r.stderr and "peak RSS" in r.stderr


def test_run_reads_the_prompt_from_stdin_or_a_file(eager_answer, tmp_path):
    """`-p -` reads standard input and `--prompt-file` a UTF-8 file: the same answer as `--prompt TEXT`; bytes that
    are not UTF-8, a missing file, an empty prompt or both sources are clear errors."""
    common = ("--context", "256", "--max-new-tokens", "6")
    r = cli("run", "default", *common, "-p", "-", input="Return the absolute value.")
    assert r.returncode == 0, r.stderr
    assert r.stdout == eager_answer + "\n"
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Return the absolute value.", encoding="utf-8")
    r = cli("run", "default", *common, "--prompt-file", str(prompt))
    assert r.returncode == 0, r.stderr
    assert r.stdout == eager_answer + "\n"
    prompt.write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    r = cli("run", "default", *common, "--prompt-file", str(prompt))
    assert r.returncode == 2 and f"--prompt-file {prompt}: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    r = cli("run", "default", *common, "--prompt-file", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt: No such file or directory" in r.stderr
    r = cli("run", "default", *common, "-p", "-", input="  \n")
    assert r.returncode == 2 and "the prompt is empty" in r.stderr
    r = cli("run", "default", *common, "-p", "hi", "--prompt-file", str(prompt))
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    r = cli("run", "default", "--context", "256", "-n", "6", "-t", "1", "-p", "Return the absolute value.")
    assert r.returncode == 0, r.stderr  # the short forms llama-cli users type
    assert r.stdout == eager_answer + "\n"


def test_run_errors_name_the_problem(tmp_path):
    r = cli("run", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "neither an artifact (no manifest.json) nor a checkpoint" in r.stderr
    tools = tmp_path / "tools.json"
    tools.write_text("{not json")
    r = cli("run", "default", "--prompt", "hi", "--tools", str(tools))
    assert r.returncode == 2 and f"{tools}: not valid JSON" in r.stderr
    r = cli("run", "default", "--prompt", "hi", "--backend", "onnx")
    assert r.returncode == 2 and "only the eager backend runs it" in r.stderr
    r = cli("run", "default", "--context", "16", "--prompt", "word " * 40)
    assert r.returncode == 2 and "but the artifact's context is 16" in r.stderr
    assert r.stdout == ""


def test_chat_reads_turns_from_stdin():
    r = cli("chat", "default", "--context", "256", "--max-new-tokens", "3", "--stats",
            input="Hello\n\nRead a file.\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2
    stats = [line for line in r.stderr.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 2 and "(0 reused" in stats[0] and "(0 reused" not in stats[1]


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on():
    """Undecodable bytes on stdin: that line is refused with a message naming it, the conversation continues."""
    import subprocess
    import sys

    from artifact_builder import REPO, cli_env

    r = subprocess.run([sys.executable, "-m", "edge_gemma.cli", "chat", "default", "--context", "256",
                        "--max-new-tokens", "3", "--stats"], input=b"hi \xff\xfe there\nHello\n", capture_output=True,
                       timeout=600, cwd=REPO, env=cli_env())
    stderr = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, stderr
    assert "line 1 of standard input is not UTF-8 text (character 3); skipped" in stderr
    assert "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("prompt ")]) == 1  # "Hello" was answered


def test_text_that_is_not_unicode_is_a_clear_error():
    from edge_gemma.paths import DEFAULT_CHECKPOINT
    from edge_gemma.processor import Processor
    from edge_gemma.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match="not valid Unicode .character 3 is a lone surrogate"):
        Processor.from_dir(DEFAULT_CHECKPOINT)([{"role": "user", "content": "hi \udcff there"}])


def _judge(tmp_path, measured: dict, *args: str):
    f = tmp_path / "m.json"
    f.write_text(json.dumps({"measured": measured}))
    return cli("bench", "unused", "--from-json", str(f), *args)


def test_bench_budget_verdict_on_injected_timings(tmp_path):
    # pi5/e2b budget: decode >= 8 tok/s, TTFT <= 7.8 s for 1024 prompt tokens, peak RSS <= 1546 MB
    over = _judge(tmp_path, {"prompt_tokens": 1024, "decode_tok_s": 4.0, "ttft_s": 9.0, "peak_rss_mb": 1000.0},
                  "--budget", "pi5", "--variant", "e2b")
    assert over.returncode == 1
    assert "decode_tok_s: 4 tok/s is 4 tok/s below the minimum of 8 tok/s (100.0% off)" in over.stderr
    assert "ttft_s: 9 s is 1.2 s above the maximum of 7.8 s (15.4% off)" in over.stderr
    assert "peak_rss_mb" not in over.stderr

    within = _judge(tmp_path, {"prompt_tokens": 1024, "decode_tok_s": 9.5, "ttft_s": 7.0, "peak_rss_mb": 1200.0},
                    "--budget", "pi5", "--variant", "e2b", "--json")
    assert within.returncode == 0, within.stderr
    result = json.loads(within.stdout)
    assert result["over_budget"] == [] and result["budget"]["decode_tok_s_min"] == 8.0

    # a TTFT measured on another prompt length is not judged against the 1024-token budget
    other = _judge(tmp_path, {"prompt_tokens": 128, "decode_tok_s": 9.5, "ttft_s": 60.0},
                   "--budget", "pi5", "--variant", "e2b")
    assert other.returncode == 0

    # phone/e2b: prefill 557 tok/s minimum
    slow = _judge(tmp_path, {"prompt_tokens": 1024, "prefill_tok_s": 300.0, "decode_tok_s": 50.0},
                  "--budget", "phone", "--variant", "e2b", "--json")
    assert slow.returncode == 1
    miss = json.loads(slow.stdout)["over_budget"]
    assert [m["figure"] for m in miss] == ["prefill_tok_s"]
    assert miss[0]["ratio"] == pytest.approx(557 / 300)


def test_bench_needs_a_variant_for_a_budget_on_the_embedded_model():
    r = cli("bench", "default", "--context", "64", "--budget", "pi5", "--new-tokens", "2")
    assert r.returncode == 2
    assert "not an E2B or E4B model" in r.stderr and "--variant" in r.stderr
    m = cli("bench", "default", "--context", "64", "--prompt-tokens", "12", "--new-tokens", "3", "--ignore-eos",
            "--json")
    assert m.returncode == 0, m.stderr
    measured = json.loads(m.stdout)["measured"]
    assert measured["prompt_tokens"] == 12 and measured["new_tokens"] == 3 and measured["backend"] == "eager"


def test_version_and_verbose_anywhere():
    from importlib.metadata import version

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edge-gemma {version('edge-gemma')}"
    r = cli("run", "default", "-v", "--context", "16", "--prompt", "word " * 40)  # -v after the subcommand
    assert r.returncode != 0 and "unrecognized arguments" not in r.stderr


def test_closed_stdout_pipe_ends_quietly():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "edge_gemma.cli", "run", "default", "--context", "256", "--prompt",
           "Return the absolute value.", "--max-new-tokens", "24"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the answer comes, as with `| head -c 0`
    err = p.stderr.read().decode()
    p.wait(timeout=600)
    assert p.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize("flag,value,says", [("--threads", "-1", ">= 1"), ("--temperature", "nan", "not a finite"),
                                              ("--top-p", "0", "> 0"), ("--max-new-tokens", "0", ">= 1"),
                                              ("--temperature", "-0.5", ">= 0"), ("--min-p", "1.5", "<= 1"),
                                              ("--min-p", "-0.1", ">= 0")])
def test_out_of_range_numbers_are_refused_at_parse_time(flag, value, says):
    r = cli("run", "default", "--prompt", "hi", flag, value)
    assert r.returncode == 2 and re.search(rf"argument (-\w/)?{flag}:", r.stderr) and says in r.stderr
    assert r.stdout == ""


def test_greedy_stop_and_min_p_reach_the_generation(eager_answer):
    """`--greedy` overrides a temperature (the greedy answer, whatever the seed); `--stop` ends the answer before
    the text (here the answer's second word, so the output is its first word); `--min-p` is passed on (1.0 keeps
    only the top token: sampling at any temperature gives the greedy answer)."""
    base = ("run", "default", "--context", "256", "--prompt", "Return the absolute value.", "--max-new-tokens", "6")
    r = cli(*base, "--temperature", "1.5", "--seed", "3", "--greedy")
    assert r.returncode == 0 and r.stdout == eager_answer + "\n", r.stderr
    r = cli(*base, "--temperature", "1.5", "--seed", "3", "--min-p", "1")
    assert r.returncode == 0 and r.stdout == eager_answer + "\n", r.stderr
    words = eager_answer.split(" ")
    assert len(words) > 1 and words[1]
    stop = " " + words[1]
    r = cli(*base, "--stop", stop, "--stop", "unlikely-never-said")
    assert r.returncode == 0 and r.stdout == eager_answer[: eager_answer.find(stop)] + "\n", r.stderr
    r = cli(*base, "--stop", "")
    assert r.returncode != 0 and "--stop needs a non-empty text" in r.stderr


def test_quantize_says_why_it_skips_the_model_level_figures_and_takes_force(tiny_checkpoints, tmp_path):
    """A checkpoint without a tokenizer gets the per-tensor report and one line saying why the model-level figures
    were skipped; `--force` replaces an earlier output (`--overwrite` is the older spelling), as in `export`."""
    src, out = tiny_checkpoints["a"], tmp_path / "q"
    assert not (src / "tokenizer.json").exists() and not (src / "tokenizer.model").exists()
    r = cli("quantize", str(src), "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "model-level figures (KL, top-1 agreement, perplexity) skipped: the checkpoint has no tokenizer" in r.stderr
    assert cli("quantize", str(src), "--out", str(out), "--no-progress").returncode != 0  # exists: refused
    for flag in ("--force", "--overwrite"):
        r = cli("quantize", str(src), "--out", str(out), "--no-progress", flag)
        assert r.returncode == 0, r.stderr
