"""The command line: every command listed and documented, help without torch, the data commands
(preprocess byte-identical to the tools/ wrapper, merge, inspect), one-line errors for bad input,
config printing, config errors before any process starts, and a training run of the tiny preset in
an empty folder (which builds the demo data)."""
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def megalite(*args, cwd=None, env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "megalite", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def tool(name, *args, timeout=600):
    """`python tools/NAME.py ARGS...`, the Megatron-style wrapper."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


# every command and the flags it takes (for the data and convert commands: exactly those of the tools)
COMMANDS = {
    "train": [],
    "demo": [],
    "config": [],
    "generate": ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--ids",
                 "--eod", "--config", "--device", "--tp"],
    "preprocess": ["--input", "--output-prefix", "--tokenizer-type", "--tokenizer-model", "--json-keys",
                   "--append-eod", "--workers", "--log-interval", "--strict", "--chunk-mb", "--allow-empty"],
    "train-tokenizer": ["--input", "--output-prefix", "--vocab-size", "--model-type", "--byte-fallback",
                        "--character-coverage", "--user-defined-symbols", "--json-keys", "--max-sentences",
                        "--max-mb", "--strict", "--max-sentence-length", "--seed", "--normalization",
                        "--no-split-digits"],
    "merge": ["--input", "--input-dir", "--output-prefix"],
    "inspect": ["--run-dir", "--config", "--data-path", "--seq-len", "--global-batch-size", "--batch", "--split",
                "--data-split", "--seed", "--train-samples", "--cache-dir", "--tokenizer-type",
                "--tokenizer-model", "--words"],
    "dedup": ["--input", "--output", "--report", "--json-key", "--threshold", "--num-perm", "--bands", "--rows",
              "--ngram", "--char-ngrams", "--seed", "--exact-only", "--workers", "--chunk-mb", "--max-pairs"],
    "convert": [],
    "convert to-hf": ["--config", "--max-shard-size", "--dtype", "--arch"],
    "convert from-hf": [],
    "convert reshard": ["--tp", "--pp", "--cp", "--ep", "--dp", "--virtual-stages", "--config"],
}
# the Megatron-style wrappers in tools/: (script, subcommand...) per command
TOOLS = {"preprocess": ("preprocess_data",), "train-tokenizer": ("train_tokenizer",),
         "merge": ("merge_datasets",), "inspect": ("inspect_data",), "dedup": ("dedup_data",),
         "convert to-hf": ("convert_checkpoint", "to-hf"), "convert from-hf": ("convert_checkpoint", "from-hf"),
         "convert reshard": ("convert_checkpoint", "reshard")}


def options(help_text):
    """The long options a --help text lists (not those its description mentions)."""
    return set(re.findall(r"^  (?:-\w, )?(--[a-z][a-z-]*)", help_text, re.M)) - {"--help"}


def test_help_lists_every_command_with_a_description():
    out = megalite("--help")
    assert out.returncode == 0, out.stderr
    listing = out.stdout.split("\ncommands:\n", 1)[1].splitlines()
    for command in (c for c in COMMANDS if " " not in c):
        i = next((i for i, line in enumerate(listing) if re.match(rf"    {command}(\s|$)", line)), None)
        assert i is not None, f"{command} is not listed:\n{out.stdout}"
        if not listing[i][4 + len(command):].strip():  # a long name puts its help on the next line
            assert re.match(r" {8,}\S", listing[i + 1]), f"{command} has no description:\n{out.stdout}"
    assert "convert to-hf|from-hf|reshard" in out.stdout


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_documents_its_flags(command):
    out = megalite(*command.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: megalite {command} ")
    assert options(out.stdout) == set(COMMANDS[command]), out.stdout


@pytest.mark.parametrize("command", list(TOOLS))
def test_the_tools_take_the_same_flags(command, capsys):
    name, *sub = TOOLS[command]
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as done:
        module.main([*sub, "--help"])
    assert done.value.code == 0
    # a wrapper is a program of its own, so it takes --debug itself (megalite, and a wrapper with
    # subcommands, take it before the command)
    assert options(capsys.readouterr().out) == set(COMMANDS[command]) | (set() if sub else {"--debug"})


def test_help_imports_no_torch():
    """Building the parser and printing any command's help loads neither torch nor numpy."""
    code = textwrap.dedent(f"""
        import sys
        from megalite.cli import main
        for command in {list(COMMANDS)!r}:
            try:
                main(command.split() + ["--help"])
            except SystemExit as e:
                assert e.code == 0, command
        print("HEAVY", sorted(m for m in ("torch", "numpy", "sentencepiece") if m in sys.modules))
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "HEAVY []"


def test_console_script_and_local_rank(capsys):
    from megalite.cli import main

    found = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "megalite"]
    if found:  # installed (pip install -e .): the script is megalite.cli:main
        assert found[0].value == "megalite.cli:main" and found[0].load() is main
    assert main(["--local_rank=1", "config", "tiny", "train.steps=70"]) == 0  # the deepspeed launcher's flag
    assert "steps: 70" in capsys.readouterr().out


def _corpus_texts(n, seed=0):
    rng = random.Random(seed)
    syllables = "ka lo mi ne ru sa to vi pe da gu ri ho ze fa".split()
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(200)]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    texts[7] = ""  # an empty document: kept, no sequence
    return texts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small corpus, its SentencePiece model, and the corpus preprocessed by `megalite preprocess`."""
    from megalite.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("cli-data")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(_corpus_texts(120))))
    model = train_sentencepiece([str(corpus)], str(root / "sp"), vocab_size=200, max_sentences=1000)
    flags = ["--input", str(root / "corpus.*"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             model, "--json-keys", "text", "--append-eod", "--workers", "1", "--log-interval", "50"]
    out = megalite("preprocess", "--output-prefix", str(root / "cli"), *flags)
    assert out.returncode == 0, out.stderr
    assert "120 docs" in out.stderr and "empty documents (kept, no sequence): 1" in out.stderr
    return {"root": root, "corpus": str(corpus), "model": model, "flags": flags,
            "prefix": str(root / "cli_text_document")}


def _bytes(prefix):
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def test_preprocess_equals_the_tool(data):
    out = tool("preprocess_data", "--output-prefix", str(data["root"] / "tool"), *data["flags"])
    assert out.returncode == 0, out.stderr
    cli = _bytes(data["prefix"])
    assert cli == _bytes(str(data["root"] / "tool_text_document"))
    from megalite.data.preprocess import preprocess

    lib = preprocess([data["corpus"]], str(data["root"] / "lib"), "SentencePieceTokenizer", data["model"],
                     append_eod=True, log_interval=0)
    assert cli == _bytes(lib.outputs["text"]) and lib.documents == 120 and len(cli[0]) > 1000


def test_merge_and_inspect_run_on_preprocessed_data(data, tmp_path, capsys):
    from megalite.cli import main
    from megalite.data.indexed import IndexedDataset
    from megalite.data.inspect import format_pieces, inspect_batch, load_decoder

    merged = str(tmp_path / "merged")
    out = megalite("merge", "--input", data["prefix"], data["prefix"], "--output-prefix", merged)
    assert out.returncode == 0, out.stderr
    assert "merged 2 datasets: 240 documents, 238 sequences" in out.stderr
    one, two = IndexedDataset(data["prefix"]), IndexedDataset(merged)
    assert two.num_documents == 240 and len(two) == 238
    for i in (0, 5, 118):
        np.testing.assert_array_equal(two[i], one[i])
        np.testing.assert_array_equal(two[119 + i], one[i])

    flags = ["--data-path", merged, "--seq-len", "16", "--global-batch-size", "4", "--batch", "2",
             "--data-split", "1,0,0", "--cache-dir", str(tmp_path / "cache"),
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["model"], "--words", "4"]
    assert main(["inspect", *flags]) == 0  # in this process: a subprocess would import torch again
    printed = capsys.readouterr().out
    pieces = inspect_batch([merged], 16, 4, 2, data_split="1,0,0", cache_dir=str(tmp_path / "cache"),
                           decode=load_decoder("SentencePieceTokenizer", data["model"]), words=4)
    assert printed == format_pieces(pieces) + "\n"
    assert pieces[0].sample == 8 and {p.position for p in pieces} == {0, 1, 2, 3}
    vocabulary = set(" ".join(_corpus_texts(120)).split())
    assert all(set(p.text.split()) <= vocabulary for p in pieces) and any(p.text for p in pieces)


@pytest.mark.parametrize("args, value, code", [
    (["preprocess", "--input", "{tmp}/nowhere/*.jsonl", "--output-prefix", "{tmp}/o",
      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{model}"], "{tmp}/nowhere/*.jsonl", 2),
    (["preprocess", "--input", "{corpus}", "--output-prefix", "{tmp}/o",
      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "{corpus}"], "{corpus}", 2),
    (["train-tokenizer", "--input", "{tmp}/none*.jsonl", "--output-prefix", "{tmp}/t", "--vocab-size", "100"],
     "{tmp}/none*.jsonl", 2),
    (["merge", "--input", "{prefix}", "{tmp}/missing", "--output-prefix", "{tmp}/m"], "{tmp}/missing", 2),
    (["inspect", "--data-path", "{tmp}/missing", "--seq-len", "8", "--global-batch-size", "2", "--batch", "0"],
     "{tmp}/missing", 2),
    (["inspect", "--data-path", "{prefix}", "--seq-len", "8", "--global-batch-size", "2", "--batch", "0",
      "--tokenizer-model", "{tmp}/nope.model"], "{tmp}/nope.model", 2),
    (["convert", "reshard", "{tmp}/no_ckpt", "{tmp}/out", "--tp", "1", "--pp", "1"], "{tmp}/no_ckpt", 2),
], ids=["preprocess-input", "preprocess-model", "train-tokenizer", "merge", "inspect-data", "inspect-model",
        "reshard"])
def test_bad_input_is_one_line_naming_the_value(args, value, code, data, tmp_path, capsys):
    """In this process (main raising instead of returning fails the test as a traceback would)."""
    from megalite.cli import main

    fill = {"tmp": str(tmp_path), "model": data["model"], "corpus": data["corpus"], "prefix": data["prefix"]}
    assert main([a.format(**fill) for a in args]) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and value.format(**fill) in lines[0], err
    assert not list(tmp_path.iterdir())  # nothing was written


def test_bad_input_in_a_real_process(tmp_path):
    out = megalite("merge", "--input", str(tmp_path / "missing"), "--output-prefix", str(tmp_path / "m"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and str(tmp_path / "missing") in out.stderr, out.stderr


def test_config_prints_resolved_yaml():
    out = megalite("config", "tiny", "train.steps=70", "optim.lr=2e-4")
    assert out.returncode == 0, out.stderr
    assert "steps: 70" in out.stdout and "lr: 0.0002" in out.stdout


@pytest.mark.parametrize("overrides, lines", [
    ([], ["# lr schedule: cosine: warmup 20 steps, then to 0.0001 at step 300",
          "# lr at step 1: 5e-05, 20: 0.001, 160: 0.00055, 300: 0.0001"]),
    (["optim.decay=wsd", "optim.wsd_decay_steps=60"],
     ["# lr schedule: wsd: warmup 20 steps, stable to step 240, exponential decay over 60 steps to 0.0001",
      "# lr at step 1: 5e-05, 20: 0.001, 240: 0.001, 270: 0.0004728, 300: 0.0001"]),
    (["optim.decay=wsd", "optim.wsd_decay_start_step=200", "optim.wsd_decay_steps=50", "optim.wsd_decay_style=linear"],
     ["# lr schedule: wsd: warmup 20 steps, stable to step 200, linear decay over 50 steps to 0.0001",
      "# lr at step 1: 5e-05, 20: 0.001, 200: 0.001, 225: 0.00055, 250: 0.0001, 300: 0.0001"]),
    (["optim.decay=inverse-square-root"],
     ["# lr schedule: inverse-square-root: warmup 20 steps, then 0.001 * sqrt(20 / step), at least 0.0001",
      "# lr at step 1: 5e-05, 20: 0.001, 160: 0.0003536, 300: 0.0002582"]),
])
def test_config_ends_with_the_lr_at_a_few_steps_as_yaml_comments(overrides, lines, capsys):
    import yaml

    from megalite.cli import main

    assert main(["config", "tiny", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == lines, out[-500:]
    assert yaml.safe_load(out)["optim"]["decay"] == (overrides[0].split("=")[1] if overrides else "cosine")


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=64", "did you mean 'hidden_size'"),
    ("model.num_kv_heads=3", "num_kv_heads"),
    ("train.global_batch_size=10", "global_batch_size"),
])
def test_bad_config_fails_before_training_with_the_key(override, message, tmp_path):
    out = megalite("train", "tiny", override, f"train.run_dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert not (tmp_path / "run").exists()  # nothing was started or written


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    """One demo corpus and tokenizer for this module: the first command that needs it builds it."""
    return tmp_path_factory.mktemp("megalite-cache")


@pytest.mark.slow
def test_tiny_trains_in_an_empty_folder_on_the_demo_corpus(tmp_path, demo_cache):
    env = {"MEGALITE_CACHE": str(demo_cache)}
    args = ["train", "tiny", "train.steps=3", "train.eval_interval=0", "checkpoint.interval=0",
            "logging.interval=1", "optim.warmup_steps=1", f"train.run_dir={tmp_path}/run"]
    out = megalite(*args, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (demo_cache / "demo" / "demo_text_document.idx").exists()
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_demo_trains_and_ends_with_a_generated_sample(tmp_path, demo_cache):
    """The demo's last words are one sampled continuation per prompt, after the exact `megalite generate`
    command that reproduces the first; the command line's overrides win over the demo's own."""
    import shlex

    args = ["demo", "train.steps=4", "train.eval_interval=2", "optim.warmup_steps=1", "logging.interval=1",
            f"train.run_dir={tmp_path}/run"]
    out = megalite(*args, cwd=tmp_path, env={"MEGALITE_CACHE": str(demo_cache)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "trained 4 steps" in out.stdout and "validation loss" in out.stdout
    more = re.search(r"^sample 1 again, or more with another --prompt or --seed: (megalite generate .*)$",
                     out.stdout, re.M)
    assert more, out.stdout[-3000:]
    command = shlex.split(more.group(1))
    assert command[:2] == ["megalite", "generate"] and command[2] == f"{tmp_path}/run/checkpoints"
    assert command[command.index("--temperature") + 1] == "0.8" and command[command.index("--top-p") + 1] == "0.9"
    assert command[command.index("--seed") + 1] == "0"
    blocks = re.split(r"^--- sample (\d) of 3: '(\w+)', seed (\d) ---$", out.stdout[more.end():], flags=re.M)
    assert "sampled: temperature 0.8, top-p 0.9" in blocks[0]
    samples = {prompt: text.strip("\n") for prompt, text in zip(blocks[2::4], blocks[4::4])}
    assert blocks[1::4] == ["1", "2", "3"] and blocks[3::4] == ["0", "1", "2"], out.stdout[-3000:]
    assert list(samples) == ["def", "import", "class"], out.stdout[-3000:]
    for prompt, text in samples.items():  # each block is its prompt and a continuation, up to the very end
        assert text.startswith(prompt) and len(text.strip()) > len(prompt), out.stdout[-3000:]
    # the printed command prints the first sample; with the last prompt and seed, the demo's very last words
    for prompt, seed in (("def", "0"), ("class", "2")):
        flags = command[1:]
        flags[flags.index("--prompt") + 1], flags[flags.index("--seed") + 1] = prompt, seed
        again = megalite(*flags, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert again.stdout.rstrip() == samples[prompt].rstrip(), (prompt, again.stdout, out.stdout[-3000:])
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
