"""Sharing on the Hub: complete folders, the model card, the folder check, and the push command without a network.

huggingface_hub 2.4 has no dry run for uploads (its `dry_run` flags are for downloads and buckets), and these tests
must not reach the Hub nor imitate it. So the upload path is tested as far as it goes offline: the folder check,
the real `CommitOperationAdd` list (huggingface_hub's own objects, with the sha256 and size the Hub would record),
and then the real `HfApi` calls, which stop at huggingface_hub's offline guard (`HF_HUB_OFFLINE`) with its
`OfflineModeIsEnabled` error naming the endpoint that push tried to reach. What a push commits is recorded by
`RecordingHub`, the real `HfApi` with only its network calls replaced.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

import retnet_hf
from retnet_hf.cli import main
from retnet_hf.data import train_tokenizer
from retnet_hf.errors import UsageError
from retnet_hf.hub import IncompleteFolderError, plan_upload, push_folder, upload_files
from retnet_hf.model_card import write_model_card
from retnet_hf.model_folder import check_folder

from conftest import REPO_ROOT, tiny_model


LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "A retentive network keeps a state instead of attending to every past token.",
    "The state decays with a fixed rate per head, so old tokens fade away slowly.",
    "Parallel, chunkwise and recurrent forms give the same outputs for the same inputs.",
    "Hugging Face folders carry weights, a config, a tokenizer and a model card.",
] * 4
COMPLETE = {
    "README.md",
    "config.json",
    "configuration_retnet.py",
    "fla_retention.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_retnet.py",
    "retention.py",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(LINES, vocab_size=300)


def write_folder(folder: Path, tokenizer, *, card: bool = True, **save_kwargs) -> Path:
    """A model folder as the package writes one: weights + config + code, tokenizer, generation config, card."""
    model = tiny_model(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.save_pretrained(folder, **save_kwargs)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if card:
        write_model_card(
            folder,
            model_name="retnet-tiny-test",
            base_model="someone/retnet-tiny-base",
            datasets=["karpathy/tiny_shakespeare"],
            training={"training steps": 3, "peak learning rate": 1e-3},
            evaluation={"eval loss (nats/token)": 2.3456789, "eval perplexity": 10.44},
            license="apache-2.0",
            language="en",
        )
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    return write_folder(tmp_path_factory.mktemp("share") / "retnet-tiny-test", tokenizer)


def child_env(tmp_path: Path) -> dict:
    """A child python that cannot see this checkout: no repo on PYTHONPATH, offline, its own module cache."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
    )
    return env


def test_written_folder_is_complete(folder):
    assert COMPLETE <= {p.name for p in folder.iterdir()}
    assert check_folder(folder) == []


def test_card_carries_the_hub_metadata_and_the_run(folder):
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert "retnet" in data["tags"]
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["karpathy/tiny_shakespeare"]
    assert data["base_model"] == "someone/retnet-tiny-base"
    assert data["language"] == "en"
    text = card.text
    assert "{{" not in text and "{%" not in text
    assert "# retnet-tiny-test" in text
    assert "| eval loss (nats/token) | 2.346 |" in text and "| eval perplexity | 10.44 |" in text
    assert "trust_remote_code=True" in text and "import retnet_hf" in text
    config = json.loads((folder / "config.json").read_text())
    assert f"| layers | {config['decoder_layers']} |" in text  # the architecture table comes from config.json


def test_card_of_a_model_trained_from_scratch_has_no_base_model(tmp_path):
    write_model_card(tmp_path, evaluation={"eval loss": 1.5})
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert "base_model" not in data and "datasets" not in data
    assert data["license"] == "mit" and "retnet" in data["tags"]


INCOMPLETE = {
    "tokenizer": (["tokenizer.json"], "no tokenizer.json or tokenizer.model"),
    "tokenizer-config": (["tokenizer_config.json"], "tokenizer_config.json is missing"),
    "code": (["modeling_retnet.py"], "modeling_retnet.py is missing"),
    "imported-code": (["retention.py"], "retention.py is missing"),  # only modeling_retnet.py's import names it
    "weights": (["model.safetensors"], "no model.safetensors"),
    "generation-config": (["generation_config.json"], "generation_config.json: missing"),
    "card": (["README.md"], "README.md: no model card"),
    "tokenizer-and-code": (["tokenizer.json", "configuration_retnet.py"], "configuration_retnet.py is missing"),
}


@pytest.mark.parametrize("case", list(INCOMPLETE))
def test_incomplete_folder_is_refused(case, folder, tmp_path, capsys, monkeypatch):
    removed, expected = INCOMPLETE[case]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    for name in removed:
        (broken / name).unlink()
    problems = check_folder(broken)
    assert len(problems) == len(removed) and any(expected in p for p in problems), problems

    # refused before any network access: the check runs first, so even a reachable Hub would see nothing
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(IncompleteFolderError) as refused:
        push_folder(broken, "someone/retnet-tiny-test")
    assert refused.value.problems == problems
    assert all(problem in str(refused.value) for problem in problems)

    assert main(["push", str(broken), "someone/retnet-tiny-test"]) != 0
    err = capsys.readouterr().err
    assert "not ready to share" in err and all(problem in err for problem in problems)
    assert "Traceback" not in err


def test_broken_metadata_and_missing_auto_map_are_reported(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    card = (broken / "README.md").read_text()
    (broken / "README.md").write_text(card.replace("library_name: transformers", "library_name: [transformers"))
    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]
    (broken / "config.json").write_text(json.dumps(config))
    problems = check_folder(broken)
    assert any(p.startswith("README.md: the metadata does not parse") for p in problems), problems
    assert any("no auto_map" in p for p in problems), problems


def test_sharded_weights_need_every_shard(tmp_path, tokenizer):
    sharded = write_folder(tmp_path / "sharded", tokenizer, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    assert check_folder(sharded) == []
    (sharded / shards[-1]).unlink()
    assert check_folder(sharded) == [f"weights: shard {shards[-1]} (listed in model.safetensors.index.json) is missing"]


def test_truncated_weights_are_reported(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    problems = check_folder(broken)
    assert len(problems) == 1 and problems[0].startswith("model.safetensors: unreadable safetensors file"), problems


def test_reloads_without_the_package_and_with_it_to_identical_logits(folder, tokenizer, tmp_path):
    ids = tokenizer(LINES[1], return_tensors="pt").input_ids
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["retnet_hf"] = None  # the editable install must not be used
        try:
            import retnet_hf
        except ImportError:
            pass
        else:
            raise SystemExit("retnet_hf is importable in the child")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(1)
        folder = {str(folder)!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert "retnet_hf" not in type(model).__module__.split(".")[0], type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        assert torch.equal(tokenizer({LINES[1]!r}, return_tensors="pt").input_ids, ids)
        with torch.no_grad():
            logits = model(ids).logits
        torch.save({{"logits": logits, "module": type(model).__module__}}, {str(tmp_path / "child.pt")!r})
    """)
    child = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    remote = torch.load(tmp_path / "child.pt")
    assert remote["module"].startswith("transformers_modules")

    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = AutoModelForCausalLM.from_pretrained(folder).eval()  # retnet_hf registered: no remote code
        assert type(local) is retnet_hf.RetNetForCausalLM
        with torch.no_grad():
            logits = local(ids).logits
    finally:
        torch.set_num_threads(threads)
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.equal(remote["logits"], logits)


def test_text_generation_pipeline_generates_and_streams(folder):
    from transformers import TextStreamer, pipeline

    class Recorder(TextStreamer):
        def __init__(self, tokenizer):
            super().__init__(tokenizer, skip_prompt=True)
            self.puts, self.text = 0, []

        def put(self, value):
            self.puts += 1
            super().put(value)

        def on_finalized_text(self, text, stream_end=False):
            self.text.append(text)

    generator = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    assert type(generator.model).__name__ == "RetNetForCausalLM"
    streamer = Recorder(generator.tokenizer)
    prompt = "The quick brown fox"
    new = 6
    out = generator(
        prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer, return_full_text=False
    )
    assert streamer.puts == 1 + new  # the prompt once, then one call per generated token
    streamed = "".join(streamer.text)
    assert streamed == out[0]["generated_text"]
    plain = generator(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_full_text=False)
    assert plain == out  # streaming changes nothing


def test_upload_plan_is_huggingface_hubs_operations_for_exactly_the_checked_files(folder, tmp_path):
    from huggingface_hub import CommitOperationAdd

    shared = tmp_path / "model"
    shutil.copytree(folder, shared)
    (shared / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # training state never goes to the Hub
    (shared / "checkpoints" / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * 64)
    (shared / "__pycache__").mkdir()
    (shared / "__pycache__" / "modeling_retnet.cpython-311.pyc").write_bytes(b"\0")
    (shared / "loss.png").write_bytes(b"\x89PNG not really")
    operations = plan_upload(shared).operations
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    assert {op.path_in_repo for op in operations} == COMPLETE | {"loss.png"}
    assert upload_files(shared) == [op.path_in_repo for op in operations]
    for op in operations:
        content = (shared / op.path_in_repo).read_bytes()
        assert op.upload_info.size == len(content)
        assert op.upload_info.sha256 == hashlib.sha256(content).digest()

    (shared / "tokenizer.json").unlink()
    with pytest.raises(IncompleteFolderError, match="tokenizer"):
        plan_upload(shared)


def test_push_goes_through_huggingface_hub_until_its_offline_guard(folder, monkeypatch):
    from huggingface_hub.errors import OfflineModeIsEnabled

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError) as offline:
        push_folder(folder, "someone/retnet-tiny-test", private=True, revision="v1", commit_message="tiny")
    assert isinstance(offline.value.__cause__, OfflineModeIsEnabled)
    message = str(offline.value)
    assert "offline mode is enabled" in message and "/api/repos/create" in message  # the real create_repo call
    from huggingface_hub import HfApi

    with pytest.raises(UsageError, match="http://127.0.0.1:9/api/repos/create"):  # the HfApi given is the one used
        push_folder(folder, "someone/retnet-tiny-test", api=HfApi(endpoint="http://127.0.0.1:9"))
    with pytest.raises(UsageError, match="either --revision or --create-pr"):
        push_folder(folder, "someone/retnet-tiny-test", revision="v1", create_pr=True)


def test_push_script_reports_the_offline_hub_without_a_traceback(folder, tmp_path):
    script = str(REPO_ROOT / "scripts" / "push_to_hub.py")
    push = subprocess.run(
        [
            sys.executable,
            script,
            str(folder),
            "someone/retnet-tiny-test",
            "--private",
            "--commit-message",
            "first upload",
        ],
        env=child_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert push.returncode == 2, push.stderr[-3000:]
    assert "retnet-hf push: error: cannot upload" in push.stderr and "offline mode is enabled" in push.stderr
    assert "Traceback" not in push.stderr


def test_push_dry_run_lists_what_would_be_uploaded(folder, capsys):
    assert main(["push", str(folder), "someone/retnet-tiny-test", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[-1] for line in lines[:-1]} == COMPLETE
    sha = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:16]
    assert any(line.split()[1] == sha and line.endswith("model.safetensors") for line in lines)
    assert "nothing was uploaded" in lines[-1]


def test_pretrain_writes_a_complete_folder_with_its_card(tmp_path):
    from retnet_hf.pretraining import PretrainSettings, pretrain

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(LINES * 6))
    settings = PretrainSettings(
        texts=(str(text),),
        output_dir=str(tmp_path / "out"),
        vocab_size=280,
        block_size=32,
        batch_size=2,
        max_steps=2,
        eval_steps=2,
        save_steps=2,
        eval_fraction=0.2,
    )
    result = pretrain(settings)
    out = tmp_path / "out"
    assert check_folder(out) == []
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and "retnet" in card.data.tags
    assert card.data.base_model is None  # trained from scratch
    assert f"| eval loss (nats/token) | {result.eval_loss:.4g} |" in card.text
    assert f"| eval perplexity | {result.eval_perplexity:.4g} |" in card.text
    assert "| training steps | 2 |" in card.text and "`corpus.txt`" in card.text
    assert "checkpoints/tokenizer/tokenizer.json" not in upload_files(out)
    assert not any(name.startswith("checkpoints/") for name in upload_files(out))


# ---------------------------------------------------------------------------------------------------------------
# Safe by default: only what a model repository is made of goes, and only finite weights


PRIVATE = "hf_PRIVATEprivatePRIVATEprivate"
SECRETS = {
    ".env": f"HF_TOKEN={PRIVATE}\n",
    "token": PRIVATE,
    ".ssh/id_ed25519": f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PRIVATE}\n",
    "credentials.json": json.dumps({"token": PRIVATE}),
    "server.pem": f"-----BEGIN PRIVATE KEY-----\n{PRIVATE}\n",
}
SHARED = COMPLETE | {"loss.png", "training_summary.json"}
NESTED = {"sub/checkpoints/checkpoint-5/model.safetensors", "sub/checkpoints/checkpoint-5/optimizer.pt"}
# each left-out path of the hostile folder, and words its line of the report must hold
HOSTILE_LEFT_OUT = {
    ".env": "SECRET? secret-looking name",
    "token": "SECRET? secret-looking name",
    ".ssh/id_ed25519": "SECRET? secret-looking name",
    "credentials.json": "SECRET? secret-looking name",
    "server.pem": "SECRET? secret-looking name",
    "notes.txt": "OUTSIDE a symlink to",
    "special_tokens_map.json": "OUTSIDE a symlink to",  # an allow-listed name, but a link out of the folder
    "keys": "OUTSIDE a symlink to",  # a folder out of the folder
    "card.md": "a symlink to README.md: push never follows links",
    "dump.bin": "not part of a model repository",
    "old_model_backup.safetensors": "weights the model does not load",
    "sub/": "a folder of 2 files",
}


def make_hostile(folder: Path, tmp_path: Path) -> Path:
    """A complete model folder that also holds what must never reach the Hub: secrets, links out of the folder (a
    file, one under an allow-listed name, a folder) and within it, a dump (the 200 MB of the report, small here), a
    backup of the weights that the model does not load, and nested checkpoints."""
    hostile = tmp_path / "hostile"
    shutil.copytree(folder, hostile)
    outside = tmp_path / "outside"
    (outside / "keys").mkdir(parents=True)
    (outside / "private.txt").write_text(PRIVATE)
    (outside / "keys" / "id_rsa").write_text(PRIVATE)
    for name, text in SECRETS.items():
        (hostile / name).parent.mkdir(exist_ok=True)
        (hostile / name).write_text(text)
    os.symlink(outside / "private.txt", hostile / "notes.txt")
    os.symlink(outside / "private.txt", hostile / "special_tokens_map.json")
    os.symlink(outside / "keys", hostile / "keys")
    os.symlink("README.md", hostile / "card.md")
    (hostile / "dump.bin").write_bytes(os.urandom(64 * 1024))
    shutil.copy(hostile / "model.safetensors", hostile / "old_model_backup.safetensors")
    nested = hostile / "sub" / "checkpoints" / "checkpoint-5"
    nested.mkdir(parents=True)
    (nested / "optimizer.pt").write_bytes(b"\0" * 256)
    shutil.copy(hostile / "model.safetensors", nested / "model.safetensors")
    (hostile / "loss.png").write_bytes(b"\x89PNG not really")
    (hostile / "training_summary.json").write_text(json.dumps({"steps": 3}))
    return hostile


class RecordingHub(HfApi):
    """The real HfApi with its network calls replaced by a record: `create_commit` keeps the operations it is given
    (so an `upload_folder` runs huggingface_hub's own choice of files and ends there, with hf_xet off)."""

    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(endpoint="https://hub.invalid")
        self.calls, self.operations = [], None
        RecordingHub.last = self

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def _validate_yaml(self, *args, **kwargs):  # upload_folder asks the Hub to validate README.md
        pass

    def create_commit(self, repo_id, operations, **kwargs):
        self.operations = list(operations)
        self.calls.append(("create_commit", repo_id, kwargs))
        return SimpleNamespace(commit_url=f"{self.endpoint}/{repo_id}/commit/0", pr_url=None)


def report_lines(err: str) -> dict:
    """The left-out report on stderr, as {path: its line}."""
    return {line.split()[0]: line for line in err.splitlines() if line.startswith("  ")}


def assert_sent_as_on_disk(operations, folder: Path) -> None:
    for op in operations:
        content = (folder / op.path_in_repo).read_bytes()
        assert op.upload_info.size == len(content) and op.upload_info.sha256 == hashlib.sha256(content).digest()


def test_push_dry_run_of_a_hostile_folder_lists_only_the_model_repository(folder, tmp_path, capsys):
    hostile = make_hostile(folder, tmp_path)
    assert main(["push", str(hostile), "someone/retnet-tiny-test", "--dry-run"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert {line.split()[-1] for line in lines[:-1]} == SHARED
    assert f"{len(HOSTILE_LEFT_OUT)} left out" in lines[-1] and "nothing was uploaded" in lines[-1]
    report = report_lines(captured.err)
    assert set(report) == set(HOSTILE_LEFT_OUT), captured.err
    for path, words in HOSTILE_LEFT_OUT.items():
        assert words in report[path], report[path]
    assert "warning: " in captured.err and all(
        name in captured.err.split("secret-looking files")[1] for name in SECRETS
    )
    assert PRIVATE not in captured.out + captured.err


def test_push_commits_exactly_the_allow_listed_files(folder, tmp_path, capsys, monkeypatch):
    hostile = make_hostile(folder, tmp_path)
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingHub)  # the one push makes
    monkeypatch.setattr("huggingface_hub.hf_api.is_xet_available", lambda: False)
    assert main(["push", str(hostile), "someone/retnet-tiny-test", "--private"]) == 0
    hub = RecordingHub.last
    assert [call[0] for call in hub.calls] == ["create_repo", "create_commit"]
    assert hub.calls[0][2]["private"] is True
    sent = sorted(op.path_in_repo for op in hub.operations)
    assert sent == sorted(SHARED)
    assert_sent_as_on_disk(hub.operations, hostile)
    captured = capsys.readouterr()
    assert set(report_lines(captured.err)) == set(HOSTILE_LEFT_OUT)  # the real push reports them too
    assert f"pushed {len(SHARED)} files" in captured.out and f"{len(HOSTILE_LEFT_OUT)} left out" in captured.out


def test_push_plan_commits_the_checked_operations_themselves(folder, tmp_path):
    from retnet_hf.hub import push_plan

    hostile = make_hostile(folder, tmp_path)
    plan = plan_upload(hostile)
    assert plan.files == sorted(SHARED) and upload_files(hostile) == plan.files
    hub = RecordingHub()
    info = push_plan(plan, "someone/retnet-tiny-test", revision="v1", commit_message="tiny", api=hub)
    assert info.commit_url.endswith("/commit/0")
    assert [call[0] for call in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert len(hub.operations) == len(plan.operations)
    assert all(sent is planned for sent, planned in zip(hub.operations, plan.operations))
    commit = hub.calls[-1][2]
    assert commit["revision"] == "v1" and commit["commit_message"] == "tiny" and commit["repo_type"] == "model"

    (hostile / "config.json").write_text((hostile / "config.json").read_text() + " ")  # changed after the check
    late = RecordingHub()
    with pytest.raises(UsageError, match=r"config.json changed in .* after it was checked: run push again"):
        push_plan(plan, "someone/retnet-tiny-test", api=late)
    assert late.calls == []


def test_include_adds_files_but_a_secret_only_by_its_exact_path(folder, tmp_path, capsys):
    hostile = make_hostile(folder, tmp_path)

    def dry_run(*include):
        code = main(
            ["push", str(hostile), "someone/retnet-tiny-test", "--dry-run", *[f"--include={p}" for p in include]]
        )
        captured = capsys.readouterr()
        return code, {line.split()[-1] for line in captured.out.splitlines()[:-1]}, captured.err

    code, sent, err = dry_run("dump.bin", "sub/")
    assert code == 0 and sent == SHARED | {"dump.bin"} | NESTED
    code, sent, err = dry_run("*")  # everything that is a regular file and does not look like a secret
    assert sent == SHARED | {"dump.bin", "old_model_backup.safetensors"} | NESTED
    assert "--include '*' matches it" in report_lines(err)[".env"]
    code, sent, err = dry_run(".ssh", "card.md")  # a folder is not an exact path; a link is never followed
    assert sent == SHARED and "SECRET?" in report_lines(err)[".ssh/id_ed25519"] and "card.md" in report_lines(err)
    code, sent, err = dry_run("token")
    assert sent == SHARED | {"token"}
    assert "warning: uploading the secret-looking token, because --include names it exactly" in err
    code, sent, err = dry_run("no-such-file.txt")
    assert code == 2 and "--include 'no-such-file.txt' matches nothing" in err and "Traceback" not in err


def test_secret_looking_names_are_told_from_model_repository_names(folder):
    from retnet_hf.hub import looks_secret, model_repository_files

    shared = model_repository_files(folder) | {
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "additional_chat_templates/tool_use.jinja",
    }
    assert not [name for name in shared if looks_secret(name)]
    secrets = [".env", ".env.local", "prod.env", "token", "hf_token.txt", "stored_tokens", "server.pem", "tls.key"]
    secrets += ["id_rsa", "id_ed25519.pub", "credentials", "gcp-credentials.json", ".netrc", ".git-credentials"]
    secrets += ["client_secret.json", ".ssh/config", "home/.aws/config", "Token", "API_KEY.txt"]
    assert [name for name in secrets if not looks_secret(name)] == []


def test_code_the_model_needs_under_a_secret_looking_name_refuses_the_push(folder, tmp_path):
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    (renamed / "modeling_retnet.py").rename(renamed / "modeling_secret.py")
    config = json.loads((renamed / "config.json").read_text())
    config["auto_map"] = {
        key: value.replace("modeling_retnet.", "modeling_secret.") for key, value in config["auto_map"].items()
    }
    (renamed / "config.json").write_text(json.dumps(config))
    assert check_folder(renamed) == []  # complete, but a push would leave out what it needs
    with pytest.raises(IncompleteFolderError, match="modeling_secret.py: the model needs it but its name looks like"):
        plan_upload(renamed)
    plan = plan_upload(renamed, include=["modeling_secret.py"])
    assert "modeling_secret.py" in plan.files and plan.included_secrets == ["modeling_secret.py"]


def test_a_required_file_behind_a_symlink_is_not_there(folder, tmp_path, capsys):
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (linked / "model.safetensors").rename(elsewhere)
    os.symlink(elsewhere, linked / "model.safetensors")
    assert check_folder(linked) == [
        f"weights: model.safetensors is a symlink to {elsewhere}, which push does not follow "
        "(put a copy of the file in place of the link)"
    ]
    assert main(["push", str(linked), "someone/retnet-tiny-test", "--dry-run"]) == 2
    assert "model.safetensors is a symlink" in capsys.readouterr().err


def corrupt(folder: Path, tmp_path: Path, dtype=None) -> tuple:
    """A copy of `folder` whose weights (cast to `dtype`) hold a NaN at the end of one tensor and an infinity at
    the start of another; the copy and the two tensors' names."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = load_file(broken / "model.safetensors")
    if dtype is not None:
        weights = {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}
    floats = sorted(name for name, t in weights.items() if t.is_floating_point() and t.dim() == 2)
    with_nan, with_inf = floats[0], floats[-1]
    weights[with_nan].view(-1)[-1] = float("nan")  # the last value: the scan reads every slice
    weights[with_inf].view(-1)[0] = float("inf")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return broken, with_nan, with_inf


def test_non_finite_weights_are_refused_naming_the_tensors(folder, tmp_path, capsys):
    broken, with_nan, with_inf = corrupt(folder, tmp_path)
    problems = check_folder(broken)
    assert len(problems) == 1 and problems[0].startswith("model.safetensors: non-finite weights in 2 of "), problems
    assert f"{with_nan} (1 NaN, 0 infinite)" in problems[0] and f"{with_inf} (0 NaN, 1 infinite)" in problems[0]
    with pytest.raises(IncompleteFolderError):
        plan_upload(broken)
    assert main(["push", str(broken), "someone/retnet-tiny-test", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "not ready to share" in err and with_nan in err and with_inf in err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e5m2])
def test_the_weight_scan_reads_every_slice_in_bounded_pieces(folder, tmp_path, monkeypatch, dtype):
    monkeypatch.setattr("retnet_hf.model_folder.SCAN_ELEMENTS", 7)  # a few values per read: many slices per tensor
    broken, with_nan, with_inf = corrupt(folder, tmp_path, dtype)
    problems = check_folder(broken)
    assert (
        len(problems) == 1 and f"{with_nan} (1 NaN" in problems[0] and f"{with_inf} (0 NaN, 1 infinite)" in problems[0]
    )


# ---------------------------------------------------------------------------------------------------------------
# What push checks in the files it sends, and how it names them


# a file of the folder, what it is overwritten with, and words the refusal names it with
NOT_WHAT_THEY_SAY = {
    "adapter-text": (
        "adapter_model.safetensors",
        PRIVATE.encode(),
        "adapter_model.safetensors: not a safetensors file",
    ),
    "tokenizer-bytes": ("tokenizer.json", bytes(range(256)) * 4, "tokenizer.json: not valid JSON"),
    "tokenizer-json": ("tokenizer.json", b'{"model": 1}', "tokenizer.json: does not load as a tokenizer"),
    "json": ("special_tokens_map.json", b'{"bos_token": ', "special_tokens_map.json: not valid JSON"),
    "template": ("chat_template.jinja", b"{{ messages \xff\xfe }}", "chat_template.jinja: not UTF-8 text"),
    "more-templates": (
        "additional_chat_templates/tool_use.jinja",
        b"\xc3\x28{{ tools }}",
        "additional_chat_templates/tool_use.jinja: not UTF-8 text",
    ),
}


@pytest.mark.parametrize("case", list(NOT_WHAT_THEY_SAY))
def test_files_that_are_not_what_their_names_say_refuse_the_push(case, folder, tmp_path, capsys):
    name, content, words = NOT_WHAT_THEY_SAY[case]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / name).parent.mkdir(exist_ok=True)
    (broken / name).write_bytes(content)
    assert check_folder(broken) == []  # present where expected: only reading them tells
    hub = RecordingHub()
    with pytest.raises(IncompleteFolderError) as refused:
        push_folder(broken, "someone/retnet-tiny-test", api=hub)
    assert hub.calls == [] and len(refused.value.problems) == 1 and refused.value.problems[0].startswith(words)
    assert main(["push", str(broken), "someone/retnet-tiny-test", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "not ready to share" in err and words in err and PRIVATE not in err


def sharded_folder(tmp_path: Path, tokenizer) -> tuple:
    """A folder whose weights are an index and its shards; the folder and the shard names."""
    sharded = write_folder(tmp_path / "sharded", tokenizer, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    return sharded, shards


def rename_in_index(folder: Path, shard: str, new: str) -> None:
    """Point the index's entries for `shard` at `new` (the file itself is left where it is)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {key: new if value == shard else value for key, value in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_an_index_goes_only_with_every_shard_it_names(tmp_path, tokenizer):
    sharded, shards = sharded_folder(tmp_path, tokenizer)
    shutil.copy(sharded / shards[0], sharded / "model-old.safetensors")  # a shard the index does not name
    plan = plan_upload(sharded)
    assert {"model.safetensors.index.json", *shards} <= set(plan.files) and "model-old.safetensors" not in plan.files

    # named otherwise than the file the upload holds: "./model-...": transformers finds it here, the Hub would not
    rename_in_index(sharded, shards[-1], "./" + shards[-1])
    assert check_folder(sharded) == []
    with pytest.raises(IncompleteFolderError, match=f"the shard ./{shards[-1]} it names is written otherwise"):
        plan_upload(sharded)

    # a shard where the Hub holds no files: the upload leaves it out
    (sharded / ".cache").mkdir()
    (sharded / shards[-1]).rename(sharded / ".cache" / shards[-1])
    rename_in_index(sharded, "./" + shards[-1], ".cache/" + shards[-1])
    assert check_folder(sharded) == []
    with pytest.raises(
        IncompleteFolderError, match=rf"the shard .cache/{shards[-1]} it names is left out .*under \.cache/"
    ):
        plan_upload(sharded)

    # an index sent by --include beside model.safetensors: its shards must go too, and be safetensors files
    single = tmp_path / "single"
    shutil.copytree(sharded, single)
    rename_in_index(single, ".cache/" + shards[-1], shards[-1])
    shutil.copy(single / shards[0], single / "model.safetensors")
    with pytest.raises(IncompleteFolderError, match=f"the shard {shards[0]} it names is left out"):
        plan_upload(single, include=["model.safetensors.index.json"])
    with pytest.raises(IncompleteFolderError, match=f"the shard {shards[-1]} it names is missing"):
        plan_upload(single, include=["*.safetensors*"])
    shutil.copy(single / ".cache" / shards[-1], single / shards[-1])
    assert {"model.safetensors.index.json", *shards} <= set(plan_upload(single, include=["*.safetensors*"]).files)
    (single / shards[-1]).write_text(PRIVATE)
    with pytest.raises(IncompleteFolderError, match=f"{shards[-1]}: not a safetensors file"):
        plan_upload(single, include=["*.safetensors*"])


def test_further_chat_templates_are_only_those_directly_in_their_folder(folder, tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(folder, templates)
    for name in ("tool_use.jinja", "a/b.jinja", "x/y/z.jinja"):
        (templates / "additional_chat_templates" / name).parent.mkdir(parents=True, exist_ok=True)
        (templates / "additional_chat_templates" / name).write_text("{{ messages }}")
    plan = plan_upload(templates)
    assert [path for path in plan.files if path.startswith("additional_chat_templates/")] == [
        "additional_chat_templates/tool_use.jinja"
    ]
    left_out = {item.path for item in plan.left_out}
    assert {"additional_chat_templates/a/b.jinja", "additional_chat_templates/x/y/z.jinja"} <= left_out


ODD_NAMES = ["evil\x1b[2K\rconfig.json", "line\nbreak.txt", "to\u200bken", "bell\x07.md"]


def test_names_are_shown_escaped(folder, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    for name in ODD_NAMES:
        (odd / name).write_text("text")

    def no_raw(text):
        return not any(char in text for char in "\x1b\r\x07\u200b") and "line\nbreak" not in text

    assert main(["push", str(odd), "someone/retnet-tiny-test", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert no_raw(err) and all(ascii(name) in err for name in ODD_NAMES), err
    assert f"  {ascii('to' + chr(0x200B) + 'ken')}" in err and "SECRET?" in report_lines(err)["'to\\u200bken'"]

    # a name in a refusal (here check_folder's words: code that auto_map names)
    config = json.loads((odd / "config.json").read_text())
    config["auto_map"]["AutoConfig"] = "configuration\x1b[1Aretnet.RetNetConfig"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompleteFolderError) as refused:
        plan_upload(odd)
    assert no_raw(str(refused.value)) and "configuration\\x1b[1Aretnet.py is missing" in str(refused.value)
    assert main(["push", str(odd), "someone/retnet-tiny-test", "--dry-run"]) == 2
    assert no_raw(capsys.readouterr().err)

    # a name in the "changed since" refusal
    from retnet_hf.hub import push_plan

    shutil.copy(folder / "config.json", odd / "config.json")
    plan = plan_upload(odd, include=["bell\x07.md"])
    (odd / "bell\x07.md").write_text("changed text")
    with pytest.raises(UsageError) as changed:
        push_plan(plan, "someone/retnet-tiny-test", api=RecordingHub())
    assert no_raw(str(changed.value)) and "'bell\\x07.md' changed in" in str(changed.value)


# secret-looking names that only a normalised name tells (each one on its own line of the report)
DISGUISED_SECRETS = [
    "api-key.txt",
    "api_key",
    "apikey",
    "API KEY.json",
    "aws_keys.txt",
    "keys.json",
    "cookies.txt",
    "session-cookie",
    "token ",
    " token",
    "t\u043eken",  # a Cyrillic o
    "\u0442oken.txt",  # a Cyrillic t
    "t\u03bfken",  # a Greek omicron
    "\uff54\uff4f\uff4b\uff45\uff4e",  # fullwidth letters
    "to\u200bken",  # a zero-width space
    "\ufefftoken",  # a zero-width no-break space
    "hf\u2060_token",  # a word joiner
    "HF-TOKEN.txt",
    "my.credentials",
    ".ENV",
    "\u0455ecret.txt",  # a Cyrillic s
]


def test_secret_names_are_matched_after_normalising_them(folder, tmp_path, capsys):
    from retnet_hf.hub import looks_secret

    assert [name for name in DISGUISED_SECRETS if not looks_secret(name)] == []
    assert not looks_secret("monkeys.txt") and not looks_secret("keyboard.md")
    shown = tmp_path / "disguised"
    shutil.copytree(folder, shown)
    for name in DISGUISED_SECRETS:
        (shown / name).write_text(PRIVATE)
    plan = plan_upload(shown, include=["*"])  # a broad include adds none of them
    assert set(plan.files) == COMPLETE
    assert sorted(item.path for item in plan.left_out if item.secret) == sorted(DISGUISED_SECRETS)
    assert main(["push", str(shown), "someone/retnet-tiny-test", "--dry-run", "--include=*"]) == 0
    err = capsys.readouterr().err
    assert err.count("SECRET?") == len(DISGUISED_SECRETS) and PRIVATE not in err


def test_a_hard_link_is_left_out_unless_named_exactly(folder, tmp_path, capsys):
    linked = tmp_path / "linked"
    shutil.copytree(folder, linked)
    outside = tmp_path / "private.txt"
    outside.write_text(PRIVATE)
    os.link(outside, linked / "notes.md")  # the same file as one outside the folder
    plan = plan_upload(linked, include=["*"])
    assert "notes.md" not in plan.files
    (item,) = [item for item in plan.left_out if item.path == "notes.md"]
    assert item.outside and "a hard link" in item.reason and "--include '*' matches it" in item.reason
    assert main(["push", str(linked), "someone/retnet-tiny-test", "--dry-run", "--include=*"]) == 0
    err = capsys.readouterr().err
    assert "OUTSIDE a hard link" in report_lines(err)["notes.md"] and "notes.md" in err.split("warning: ")[-1]

    plan = plan_upload(linked, include=["notes.md"])  # named exactly: sent, and announced
    assert "notes.md" in plan.files and plan.included_links == ["notes.md"]
    assert main(["push", str(linked), "someone/retnet-tiny-test", "--dry-run", "--include=notes.md"]) == 0
    assert "warning: uploading the hard link notes.md" in capsys.readouterr().err

    # a file the allow-list names cannot go as a hard link, nor be left out quietly
    (linked / "training_summary.json").write_text(json.dumps({"steps": 3}))
    os.link(linked / "training_summary.json", tmp_path / "summary-elsewhere.json")
    with pytest.raises(IncompleteFolderError, match="training_summary.json: a hard link"):
        plan_upload(linked)
    assert "training_summary.json" in plan_upload(linked, include=["training_summary.json"]).files
