"""The model folder's one home: which folder (a local path or a Hub id; is it a model folder) and which files (the
weights the model loads, in transformers' view and in push's). Staging and the completeness check are tested
where they are used (test_conversion, test_onnx_runtime, test_evaluation; test_hub)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from retnet_hf.errors import UsageError
from retnet_hf.model_folder import (
    PICKLED_WEIGHTS,
    SINGLE_WEIGHTS,
    WEIGHTS_INDEX,
    WeightIndexError,
    count_parameters,
    index_shards,
    is_local,
    is_model_folder,
    require_model_folder,
    resolve_source,
    weight_files,
)


def write_index(folder: Path, weight_map: dict, name: str = WEIGHTS_INDEX) -> None:
    (folder / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_local_path_is_kept_and_a_hub_id_passes_as_given(tmp_path):
    assert resolve_source(str(tmp_path)) == str(tmp_path) and is_local(tmp_path)
    assert resolve_source("someone/retnet-tiny") == "someone/retnet-tiny" and not is_local("someone/retnet-tiny")
    assert resolve_source("gpt2") == "gpt2"  # a bare name can be a Hub id of a model


@pytest.mark.parametrize("source", ["./no/such", "/no/such", "~/no/such/retnet", "a/b/c", "bad name"])
def test_a_local_path_that_is_not_there_is_named_as_a_missing_folder(source):
    with pytest.raises(UsageError, match=rf"^{source}: no such tokenizer folder$"):
        resolve_source(source, "tokenizer")


def test_a_file_is_not_a_folder_unless_files_are_asked_for(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"")
    with pytest.raises(UsageError, match="a file, not a model folder"):
        resolve_source(str(file))
    assert resolve_source(str(file), files=True) == str(file)


def test_where_files_are_asked_for_a_bare_missing_name_is_a_file_and_the_error_class_is_the_callers():
    class Refused(Exception):
        pass

    with pytest.raises(Refused, match=r"model\.pt: no such file or folder \(and not a Hub id of the form owner/name\)"):
        resolve_source("model.pt", files=True, download=True, error_class=Refused)


def test_a_model_folder_is_a_folder_with_config_json(tmp_path):
    assert not is_model_folder(tmp_path)
    with pytest.raises(UsageError, match=r"not a model folder \(no config.json\); do this"):
        require_model_folder(tmp_path, "; do this")
    with pytest.raises(UsageError, match=r"not a model folder \(no such folder\)"):
        require_model_folder(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"not a model folder \(a file\)"):
        require_model_folder(tmp_path / "file")
    (tmp_path / "config.json").write_text("{}")
    assert is_model_folder(str(tmp_path)) and require_model_folder(str(tmp_path)) == tmp_path


def test_the_weights_are_chosen_as_transformers_chooses_them(tmp_path):
    assert weight_files(tmp_path) == []
    write_index(tmp_path, {"b": "model-2.safetensors", "a": "model-1.safetensors", "c": "model-2.safetensors"})
    assert index_shards(tmp_path) == ["model-2.safetensors", "model-1.safetensors"]  # the order it names them
    assert weight_files(tmp_path) == [WEIGHTS_INDEX, "model-2.safetensors", "model-1.safetensors"]  # there or not
    (tmp_path / SINGLE_WEIGHTS).write_bytes(b"")
    assert weight_files(tmp_path) == [SINGLE_WEIGHTS]  # loaded before the index
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / PICKLED_WEIGHTS).write_bytes(b"")
    assert weight_files(pickled) == [] and weight_files(pickled, pickled=True) == [PICKLED_WEIGHTS]


def test_push_never_follows_a_link_to_the_weights(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_index(elsewhere, {"a": "model-1.safetensors"})
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / WEIGHTS_INDEX).symlink_to(elsewhere / WEIGHTS_INDEX)
    assert weight_files(folder) == [WEIGHTS_INDEX, "model-1.safetensors"]
    assert weight_files(folder, links=False) == [WEIGHTS_INDEX]  # listed alone, unread
    (folder / SINGLE_WEIGHTS).symlink_to(tmp_path / "missing.safetensors")  # a dangling link
    assert weight_files(folder)[0] == WEIGHTS_INDEX and weight_files(folder, links=False) == [SINGLE_WEIGHTS]


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"metadata": {}}), "no weight_map"),
        (json.dumps({"weight_map": {"a": 1}}), "no weight_map"),
    ],
)
def test_an_index_that_does_not_give_its_shards_is_an_error_naming_it(tmp_path, content, reason):
    (tmp_path / WEIGHTS_INDEX).write_text(content)
    with pytest.raises(WeightIndexError, match=reason) as error:
        weight_files(tmp_path)
    assert error.value.index == WEIGHTS_INDEX and isinstance(error.value, ValueError)


def test_the_parameters_are_counted_from_the_weight_headers(tmp_path):
    assert count_parameters(tmp_path) is None
    save_file({"a": torch.zeros(2, 3)}, str(tmp_path / "model-1.safetensors"))
    save_file({"b": torch.zeros(4)}, str(tmp_path / "model-2.safetensors"))
    write_index(tmp_path, {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    assert count_parameters(tmp_path) == 10
    (tmp_path / WEIGHTS_INDEX).write_text("{")
    assert count_parameters(tmp_path) is None
