"""Sharing on the Hub: complete folders, the model card, the folder check, and the push command without a network.

huggingface_hub 2.4 has no dry run for uploads (its `dry_run` flags are for downloads and buckets), and these tests
must not reach the Hub nor imitate it. So the upload path is tested as far as it goes offline: the folder check,
the real `CommitOperationAdd` list (huggingface_hub's own objects, with the sha256 and size the Hub would record),
and then the real `HfApi` calls, which stop at huggingface_hub's offline guard (`HF_HUB_OFFLINE`) with its
`OfflineModeIsEnabled` error naming the endpoint that push tried to reach.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

import retnet_hf
from retnet_hf.cli import main
from retnet_hf.data import train_tokenizer
from retnet_hf.errors import UsageError
from retnet_hf.hub import IncompleteFolderError, plan_upload, push_folder, upload_files
from retnet_hf.model_card import check_folder, write_model_card

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
    operations = plan_upload(shared)
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
