"""transformers' own common model tests, `ModelTesterMixin` and `ConfigTester`, run against RetNet: what every
model in the library passes, this one passes, and what does not apply to a recurrent model is skipped by name.

The tests come from the source distribution of the installed transformers on the package index (`pip download
--no-binary :all: --no-deps transformers==X`), unpacked into a temporary folder; nothing of them is kept in this
repository. The sdist holds the root `tests/*.py` but not the folders they import from, so three small stand-ins
written here take their place: `exporters/test_export.py` (the sdist's `ExportTesterMixin` is absent; ours
exports each model class with `torch.export` and compares it with eager), `generation/test_utils.py` (a marker
class `GenerationTesterMixin`: transformers' generation tests are not in the sdist; `tests/model/test_cache.py`
makes their checks of a recurrent cache, `tests/model/test_generation.py` covers generate()), and `utils/test_configuration_utils.py` (the common config arguments `ConfigTester` sets).
`RETNET_TRANSFORMERS_SDIST` may point at the `.tar.gz`; otherwise it is downloaded into `~/.cache/retnet-hf`.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import unittest
from pathlib import Path

import pytest
import torch
import transformers

from retnet_hf import RetNetConfig, RetNetForCausalLM, RetNetForSequenceClassification, RetNetModel


SDIST_ENV = "RETNET_TRANSFORMERS_SDIST"
COMMON_FILES = ("test_modeling_common.py", "test_configuration_common.py")

STAND_INS = {
    "exporters/test_export.py": '''
        """Stand-in (written by retnet-hf) for transformers' tests/exporters/test_export.py, absent from the sdist."""
        import torch
        from transformers.testing_utils import torch_device


        class ExportTesterMixin:
            test_torch_exportable = True

            def test_torch_export(self):
                """Each model class exports with torch.export and the exported program gives eager's outputs."""
                if not self.test_torch_exportable:
                    self.skipTest("test_torch_exportable is False")
                config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
                for model_class in self.all_model_classes:
                    with self.subTest(model_class.__name__):
                        model = model_class(config).to(torch_device).eval()
                        kwargs = dict(inputs, use_cache=False, return_dict=False)
                        with torch.no_grad():
                            eager = model(**kwargs)
                            program = torch.export.export(model, args=(), kwargs=kwargs, strict=False)
                            exported = program.module()(**kwargs)
                        self.assertEqual(len(eager), len(exported))
                        for a, b in zip(eager, exported):
                            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ''',
    "generation/test_utils.py": '''
        """Stand-in (written by retnet-hf) for transformers' tests/generation/test_utils.py, absent from the sdist."""


        class GenerationTesterMixin:
            pass
    ''',
    "utils/test_configuration_utils.py": '''
        """Stand-in (written by retnet-hf): common config arguments, each set to a value other than its default."""
        import torch

        config_common_kwargs = {
            "return_dict": False,
            "output_hidden_states": True,
            "dtype": torch.float16,
            "tie_word_embeddings": True,
            "pad_token_id": 5,
            "bos_token_id": 6,
            "eos_token_id": 7,
            "problem_type": "regression",
            "id2label": {0: "NEGATIVE", 1: "POSITIVE"},
            "label2id": {"NEGATIVE": 0, "POSITIVE": 1},
        }
    ''',
}


def _sdist() -> Path:
    """The transformers sdist of the installed version: given, cached, or downloaded from the package index."""
    version = transformers.__version__
    if os.environ.get(SDIST_ENV):
        return Path(os.environ[SDIST_ENV])
    cache = Path.home() / ".cache" / "retnet-hf" / "transformers-sdist"
    path = cache / f"transformers-{version}.tar.gz"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"transformers=={version}",
                "-d",
                str(cache),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0 or not path.exists():
            pytest.skip(
                f"could not download the transformers {version} sdist from the package index (set "
                f"{SDIST_ENV}): {result.stderr.strip()[-300:]}",
                allow_module_level=True,
            )
    return path


def _load_common_tests():
    """Unpack the common test files with the stand-ins into a temporary package and import it."""
    root = Path(tempfile.mkdtemp(prefix="transformers_common_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    package = root / "transformers_common_tests"
    package.mkdir()
    with tarfile.open(_sdist()) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and parts[2] in COMMON_FILES:
                (package / parts[2]).write_bytes(archive.extractfile(member).read())
    missing = [name for name in COMMON_FILES if not (package / name).exists()]
    if missing:
        pytest.fail(f"the transformers {transformers.__version__} sdist has no tests/{', tests/'.join(missing)}")
    for relative, text in STAND_INS.items():
        path = package / relative
        path.parent.mkdir(exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(text))
    (package / "__init__.py").touch()
    sys.path.insert(0, str(root))
    from transformers_common_tests import test_configuration_common, test_modeling_common

    return test_modeling_common, test_configuration_common


pytest.importorskip("parameterized", reason="the common tests need `parameterized` (pip install -e '.[dev]')")
common, configuration_common = _load_common_tests()


class RetNetModelTester:
    """Tiny configs and inputs in the shape the common tests expect: a 7-token prompt over chunks of 4 tokens
    (the chunkwise form with a state handed across chunks), some rows left-padded."""

    def __init__(
        self,
        parent,
        batch_size=3,
        seq_length=7,
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.num_attention_heads, self.intermediate_size = num_attention_heads, intermediate_size
        self.is_training = is_training
        self.num_labels = 3
        self.pad_token_id = 0

    def get_config(self) -> RetNetConfig:
        return RetNetConfig(
            vocab_size=self.vocab_size,
            decoder_embed_dim=self.hidden_size,
            decoder_value_embed_dim=2 * self.hidden_size,
            decoder_ffn_embed_dim=self.intermediate_size,
            decoder_layers=self.num_hidden_layers,
            decoder_retention_heads=self.num_attention_heads,
            recurrent_chunk_size=4,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
        )

    def prepare_config_and_inputs_for_common(self):
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, :2] = 0  # a left-padded row
        input_ids[attention_mask == 0] = self.pad_token_id
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


# Common tests that do not apply to RetNet, each with the reason.
NOT_APPLICABLE = {
    "test_generation_tester_mixin_inheritance": "the sdist does not ship tests/generation: the cache checks of its "
    "GenerationTesterMixin are in tests/model/test_cache.py, generate() in tests/model/test_generation.py",
}


# The common tests tell a base model from one with a head, and which labels a head takes, by transformers' name
# maps, which only in-library models are in; for the duration of these tests RetNet is entered as one would be.
NAME_MAPS = {
    "MODEL_MAPPING_NAMES": "RetNetModel",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "RetNetForCausalLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "RetNetForSequenceClassification",
}


class RetNetModelTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (RetNetModel, RetNetForCausalLM, RetNetForSequenceClassification)
    has_attentions = False  # retention has no attention weights (as Mamba's test sets it)

    @classmethod
    def setUpClass(cls):
        from transformers.models.auto import modeling_auto

        for name, class_name in NAME_MAPS.items():
            getattr(modeling_auto, name)[RetNetConfig.model_type] = class_name

    @classmethod
    def tearDownClass(cls):
        from transformers.models.auto import modeling_auto

        for name in NAME_MAPS:
            getattr(modeling_auto, name).pop(RetNetConfig.model_type, None)

    def setUp(self):
        self.model_tester = RetNetModelTester(self)
        self.config_tester = configuration_common.ConfigTester(
            self,
            config_class=RetNetConfig,
            decoder_embed_dim=32,
            decoder_retention_heads=2,
            decoder_layers=2,
            vocab_size=99,
            decoder_value_embed_dim=64,
        )
        name = self._testMethodName
        if name in NOT_APPLICABLE:
            self.skipTest(NOT_APPLICABLE[name])

    def test_config(self):
        self.config_tester.run_common_tests()
