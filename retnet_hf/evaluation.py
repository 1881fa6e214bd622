"""Evaluating a model folder with EleutherAI's lm-evaluation-harness (lm-eval): `retnet-hf eval` and local tasks.

`evaluate_folder(settings)` loads the folder as the other commands do (`loading.load_causal_lm`: no foreign code
without `--trust-remote-code`, no missing weights), wraps it in lm-eval's own `HFLM` and runs
`lm_eval.simple_evaluate`; every request is lm-eval's (loglikelihood: one forward over right-padded rows without
an attention mask; generate_until: `generate()` on left-padded rows with the mask and the stop strings).

The context length. lm-eval's `HFLM` takes its `max_length` (the left truncation of every request and the window of
rolling perplexity) from the config's `n_positions` / `max_position_embeddings` / `n_ctx`, else from the tokenizer's
`model_max_length`, else 2048. A RetNet has no position table and no limit, so its config names none of them, and
the tokenizer's value belongs to the tokenizer (1,000,000 in the ones `retnet-hf train` makes; unset, hence 2048,
in most borrowed ones). The command therefore passes `max_length` itself: `--max-length` when given, else for a model
whose config names no limit `UNBOUNDED_CONTEXT` (whole requests, a rolling document in one window); a model whose
config names a limit (a Llama) keeps lm-eval's own reading. The config does not carry a made-up limit: other tools
read `max_position_embeddings` as a real one (generate() caps its default length by it, servers size their
schedulers by it, lm-eval's `batch_size=auto` probes a batch of that many tokens).

The local tasks (`write_local_tasks`) are built from the data the package ships (`retnet_hf.sample_data`, or
`--data-dir` with files of the same names): JSON-lines documents and lm-eval task YAMLs (`dataset_path: json`,
`dataset_kwargs.data_files`), all tagged `retnet_hf_local`:
- `shakespeare_next_line` (multiple_choice, acc / acc_norm): the speaker and a few lines of a speech, then the true
  next line among three other lines of the same text (none of them a speech's first line);
- `shakespeare_perplexity` (loglikelihood_rolling: word and byte perplexity, bits per byte): passages of about
  2,000 characters;
- `guanaco_generate` (generate_until, chrF): single-turn guanaco questions in the chat format of `retnet-hf sft`
  (`### Human: q### Assistant:`), 32 greedy tokens, stopped at the next `### Human:`.
The Shakespeare tasks use only the held-out part of Tiny Shakespeare (its text after character 1,000,000): a model
trained on `sample_data`'s training file, or on the first 1,000,000 characters of the whole corpus
(`benchmarks.compare_with_transformer --max-chars 1000000`), has not seen it.
"""

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import model_folder, sample_data
from .errors import UsageError, require
from .options import positive_int


DEFAULT_DATA_DIR = sample_data.FOLDER
SHAKESPEARE_FILE = sample_data.SHAKESPEARE_HELD_OUT.name  # play text held out from training
GUANACO_FILE = sample_data.GUANACO.name  # chat rows in the Llama-2 form

LOCAL_TAG = "retnet_hf_local"
NEXT_LINE, PERPLEXITY, GENERATE = "shakespeare_next_line", "shakespeare_perplexity", "guanaco_generate"
LOCAL_TASKS = (NEXT_LINE, PERPLEXITY, GENERATE)

# The max_length a model without a position limit gets: longer than any request of these tasks, and the bound the
# tokenizers of `retnet-hf train` carry as model_max_length (`data.train_tokenizer`).
UNBOUNDED_CONTEXT = 1_000_000
# lm-eval's reading of a config's context length (lm_eval.models.utils.resolve_max_length, 0.4.13)
POSITION_LIMIT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def task_list(text: str) -> Tuple[str, ...]:
    """An argparse type: comma-separated task names."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        import argparse

        raise argparse.ArgumentTypeError(f"must name at least one task, got {text!r}")
    return names


def limit_value(text: str) -> Union[int, float]:
    """An argparse type: lm-eval's `limit`, a number of documents per task (>= 1) or a fraction in (0, 1)."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value.is_integer() and value >= 1:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"must be a number of documents (>= 1) or a fraction in (0, 1), got {text}")


@dataclass
class EvalSettings:
    """One evaluation; `retnet-hf eval`'s options are made from these fields."""

    folder: str = field(default="", metadata=dict(positional=True, help="a model folder"))
    tasks: Tuple[str, ...] = field(
        default=(LOCAL_TAG,),
        metadata=dict(
            parse=task_list,
            help=f"comma-separated lm-eval task, group or tag names (default {LOCAL_TAG}: the local tasks "
            f"{', '.join(LOCAL_TASKS)}); lm-eval's own tasks need their data set (the Hub, or its cache offline)",
        ),
    )
    tasks_dir: Optional[str] = field(
        default=None, metadata=dict(help="a folder of your own lm-eval task YAMLs (lm-eval's include_path)")
    )
    data_dir: str = field(
        default=str(DEFAULT_DATA_DIR),
        metadata=dict(help=f"where the local tasks' text is ({SHAKESPEARE_FILE}, {GUANACO_FILE})"),
    )
    batch_size: int = field(default=4, metadata=dict(parse=positive_int, help="requests per forward (default 4)"))
    dtype: str = field(
        default="auto",
        metadata=dict(
            choices=DTYPES, help="the weights' dtype: auto (as saved in the folder), float32, bfloat16, float16"
        ),
    )
    limit: Optional[Union[int, float]] = field(
        default=None,
        metadata=dict(parse=limit_value, help="only the first N documents of each task (or a fraction); for tests"),
    )
    max_length: Optional[int] = field(
        default=None,
        metadata=dict(
            parse=positive_int,
            help="context length in tokens (default: the config's position limit; none for a RetNet: whole requests)",
        ),
    )
    quantize: Optional[str] = field(
        default=None,
        metadata=dict(
            choices=("int8", "int4"),
            help="evaluate the model with quantized weights on ONNX Runtime, as generate and chat --quantize run it",
        ),
    )
    output: Optional[str] = field(
        default=None, metadata=dict(help="the results JSON to write (default FOLDER/eval_results.json)")
    )
    log_samples: bool = field(
        default=False, metadata=dict(help="keep every request and response in the JSON (lm-eval's samples)")
    )
    trust_remote_code: bool = field(
        default=False, metadata=dict(help="let a folder that is not a RetNet run its own Python code")
    )


# ------------------------------------------------------------------------------------------------ local tasks


def _held_out_shakespeare(data_dir: Path) -> str:
    return _read_data(data_dir, SHAKESPEARE_FILE).read_text(encoding="utf-8")


def _read_data(data_dir: Path, name: str) -> Path:
    path = Path(data_dir) / name
    if not path.is_file():
        raise UsageError(f"{path}: no such file; the local tasks are built from it (give --data-dir)")
    return path


def _speeches(text: str) -> List[List[str]]:
    """The speeches of a play text: a speaker line ("NAME:") and at least one line of the speech."""
    speeches = []
    for block in text.split("\n\n"):
        lines = [line for line in block.strip("\n").split("\n") if line.strip()]
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append(lines)
    return speeches


def next_line_documents(
    text: str, count: int = 200, context_lines: int = 4, seed: int = 0, source: Optional[Path] = None
) -> List[dict]:
    """Multiple choice: the speaker and up to `context_lines` lines of a speech, then its true next line among
    three other lines of `text` that are not a speech's first line either (drawn with a seeded generator), in a
    seeded order; `label` is the true one's. A text without such speeches, or with fewer than four different lines
    to choose from, is a UsageError naming `source`."""
    rng = random.Random(seed)
    speeches = [s for s in _speeches(text) if len(s) >= 3]  # a speaker, a line of context, the line to find
    # distractors from the lines a target can be (not a speech's first line: often a short, common exclamation
    # that a weak model prefers to any longer line)
    pool = [line for speech in speeches for line in speech[2:]]
    if not speeches or len(set(pool)) < 4:  # three distractors besides any target: else the drawing never ends
        raise UsageError(
            f"{source or 'the text'}: {len(speeches)} speeches (a 'NAME:' line, then at least two lines) and "
            f"{len(set(pool))} different lines to draw choices from; the next-line task needs a play text with at "
            "least one such speech and four different lines"
        )
    documents = []
    for speech in speeches[:count]:
        position = rng.randrange(2, len(speech))  # the line to find; lines 1 .. position-1 come before it
        target = speech[position]
        context = [speech[0]] + speech[max(1, position - context_lines) : position]
        distractors = []
        while len(distractors) < 3:
            line = rng.choice(pool)
            if line != target and line not in distractors:
                distractors.append(line)
        label = rng.randrange(4)
        documents.append(
            {
                "context": "\n".join(context),
                "choices": distractors[:label] + [target] + distractors[label:],
                "label": label,
            }
        )
    return documents


def perplexity_documents(text: str, count: int = 40, chars: int = 2000, source: Optional[Path] = None) -> List[dict]:
    """Passages of `text` as it is, each cut at the first speech boundary (a blank line) after `chars`
    characters, in the order of the text; a text too short for one is a UsageError naming `source`."""
    documents, start = [], 0
    while len(documents) < count:
        end = text.find("\n\n", start + chars)
        if end < 0:
            break
        documents.append({"text": text[start:end]})
        start = end + 2
    if not documents:
        raise UsageError(
            f"{source or 'the text'}: no passage of {chars:,} characters ending at a blank line; the perplexity "
            "task needs a longer text"
        )
    return documents


def generation_documents(data_dir: Path, count: int = 50, max_question_chars: int = 300) -> List[dict]:
    """The first single-turn guanaco rows with a short question: the prompt in `retnet-hf sft`'s chat format and
    the reference answer."""
    from .data import llama2_messages, render_guanaco

    pyarrow_parquet = require("pyarrow.parquet", "eval")
    path = _read_data(data_dir, GUANACO_FILE)
    try:
        rows = pyarrow_parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    except Exception as error:  # pyarrow's ArrowInvalid and kin: a damaged or foreign file
        raise UsageError(f"{path}: cannot read it as a parquet file with a 'text' column: {error}") from error
    documents = []
    for row in rows:
        try:
            messages = llama2_messages(row)
        except ValueError:
            continue
        if [m["role"] for m in messages] != ["user", "assistant"] or len(messages[0]["content"]) > max_question_chars:
            continue
        prompt = render_guanaco(messages[:1], add_generation_prompt=True)
        documents.append({"prompt": prompt, "answer": messages[1]["content"]})
        if len(documents) == count:
            break
    if not documents:
        raise UsageError(f"{path}: no single-turn chat row with a question of {max_question_chars} characters at most")
    return documents


def _task_config(name: str, data_file: Path, cache_dir: Path, **fields) -> dict:
    return {
        "task": name,
        "tag": [LOCAL_TAG],
        "dataset_path": "json",
        # the data set's own cache stays in the task folder (a temporary one for `retnet-hf eval`)
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache_dir)},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }


def write_local_tasks(
    folder: Union[str, Path], data_dir: Union[str, Path] = DEFAULT_DATA_DIR, tasks: Sequence[str] = LOCAL_TASKS
) -> Path:
    """Write the documents (`<task>.jsonl`) and lm-eval configs (`<task>.yaml`, absolute paths) of the local
    `tasks` into `folder`, for `TaskManager(include_path=folder)` or `lm_eval --include_path folder`, reading only
    their own data; returns `folder`."""
    yaml = require("yaml", "eval")
    folder, data_dir = Path(folder).resolve(), Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    mean = {"aggregation": "mean", "higher_is_better": True}
    makers = {
        NEXT_LINE: lambda: (
            next_line_documents(_held_out_shakespeare(data_dir), source=data_dir / SHAKESPEARE_FILE),
            dict(
                output_type="multiple_choice",
                doc_to_text="{{context}}",
                doc_to_choice="choices",
                doc_to_target="label",
                target_delimiter="\n",
                metric_list=[{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}],
            ),
        ),
        PERPLEXITY: lambda: (
            perplexity_documents(_held_out_shakespeare(data_dir), source=data_dir / SHAKESPEARE_FILE),
            dict(
                output_type="loglikelihood_rolling",
                doc_to_text="",
                doc_to_target="{{text}}",
                metric_list=[
                    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                ],
            ),
        ),
        GENERATE: lambda: (
            generation_documents(data_dir),
            dict(
                output_type="generate_until",
                doc_to_text="{{prompt}}",
                doc_to_target="{{answer}}",
                generation_kwargs={"until": ["### Human:"], "max_gen_toks": 32, "do_sample": False},
                metric_list=[{"metric": "chrf", "aggregation": "chrf", "higher_is_better": True}],
            ),
        ),
    }
    for name in tasks:
        documents, fields = makers[name]()
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents), encoding="utf-8")
        config = _task_config(name, data_file, folder / "datasets_cache", **fields)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return folder


# ------------------------------------------------------------------------------------------------- evaluation


def context_length(config, requested: Optional[int] = None) -> Optional[int]:
    """The `max_length` to give lm-eval's HFLM: `requested`; else None (lm-eval reads it) for a config that names
    a position limit; else `UNBOUNDED_CONTEXT` (a RetNet)."""
    if requested is not None:
        return requested
    config = getattr(config, "text_config", None) or config
    if any(getattr(config, name, None) is not None for name in POSITION_LIMIT_FIELDS):
        return None
    return UNBOUNDED_CONTEXT


def lm_eval_model(model, tokenizer, batch_size: int = 1, max_length: Optional[int] = None):
    """lm-eval's own `HFLM` around a loaded model and tokenizer (the model's config decides the context length,
    see `context_length`); log-softmax in float32 for half-precision weights."""
    import torch

    huggingface = require("lm_eval.models.huggingface", "eval")
    half = model.dtype in (torch.float16, torch.bfloat16)
    return huggingface.HFLM(
        pretrained=model,
        backend="causal",
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=context_length(model.config, max_length),
        softmax_dtype=torch.float32 if half else None,
    )


def task_manager(task_names, include_paths: List[Path]):
    """lm-eval's TaskManager over `include_paths`; lm-eval's own tasks are indexed too (about 20 s) only when a
    name is not found in those folders."""
    from fnmatch import fnmatchcase

    tasks = require("lm_eval.tasks", "eval")

    def unknown(manager):
        return [
            name
            for name in task_names
            if name not in manager.all_tasks
            and not Path(name).is_file()
            and not any(fnmatchcase(known, name) for known in manager.all_tasks)
        ]

    paths = [str(p) for p in include_paths]
    if paths:
        manager = tasks.TaskManager(include_path=paths, include_defaults=False)
        if not unknown(manager):
            return manager
    manager = tasks.TaskManager(include_path=paths or None)
    missing = unknown(manager)
    if missing:
        raise UsageError(
            f"unknown task(s): {', '.join(missing)}; the local ones are {', '.join((LOCAL_TAG,) + LOCAL_TASKS)}, "
            "a folder of your own YAMLs goes in --tasks-dir, and `lm-eval ls tasks` lists lm-eval's"
        )
    return manager


RESULTS_FILE = "eval_results.json"  # a model folder's own results file: the one file of the folder eval writes
GENERATED_TOKENS = 32  # what guanaco_generate generates: lm-eval needs a context length above it


def results_path(s: EvalSettings) -> Path:
    """Where the results go, checked before any work: FOLDER/eval_results.json, or `--output` if it is not a file
    of the model folder, not an existing file other than an earlier eval result, and writable."""
    folder = Path(s.folder).resolve()
    output = Path(s.output) if s.output else Path(s.folder) / RESULTS_FILE
    resolved = output.resolve()
    if resolved != folder / RESULTS_FILE and folder in resolved.parents:
        raise UsageError(
            f"--output {output}: a file of the model folder {s.folder}; eval writes there only its own "
            f"{RESULTS_FILE} (the default): leave --output out, or give a path outside the folder"
        )
    model_folder.check_writable_file(output, "results")
    if output.exists() or output.is_symlink():
        try:
            earlier = json.loads(output.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "results" in earlier and "retnet_hf" in earlier):
            raise UsageError(
                f"--output {output}: the file exists and is not an earlier result of retnet-hf eval; it is left as "
                "it is: give another path, or move the file away"
            )
    return output


def _notify(message: str) -> None:
    print(f"retnet-hf eval: {message}", file=sys.stderr)


def _local_tasks(names: Sequence[str]) -> Tuple[str, ...]:
    """The local tasks that `names` ask for (the tag asks for all of them)."""
    return LOCAL_TASKS if LOCAL_TAG in names else tuple(name for name in LOCAL_TASKS if name in names)


def evaluate_folder(s: EvalSettings) -> dict:
    """Run lm-eval on the folder `s.folder`; write its results (lm-eval's dict, plus a `retnet_hf` entry with the
    settings used) to `s.output` (default FOLDER/eval_results.json, see `results_path`), whole or not at all, and
    return them."""
    from .text_generation import load_for_inference  # the one loader for inference, as generate and chat load

    lm_eval = require("lm_eval", "eval")
    if s.tasks_dir is not None and not Path(s.tasks_dir).is_dir():
        raise UsageError(f"{s.tasks_dir}: no such task folder")
    output = results_path(s)
    local = _local_tasks(s.tasks)
    if GENERATE in local and s.max_length is not None and s.max_length <= GENERATED_TOKENS:
        raise UsageError(
            f"--max-length {s.max_length}: {GENERATE} generates {GENERATED_TOKENS} tokens within the context "
            f"length; give more than {GENERATED_TOKENS}, or leave it out (a RetNet needs none)"
        )
    model, tokenizer = load_for_inference(s.folder, s.trust_remote_code, s.quantize, dtype=s.dtype)
    lm = lm_eval_model(model, tokenizer, batch_size=s.batch_size, max_length=s.max_length)
    with model_folder.scratch_folder("eval", _notify) as scratch:
        include = [write_local_tasks(scratch / "tasks", s.data_dir, local)] if local else []
        include += [Path(s.tasks_dir)] if s.tasks_dir else []
        manager = task_manager(s.tasks, include)
        model_args = f"pretrained={s.folder},dtype={s.dtype},max_length={lm.max_length}"
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                model_args=model_args,  # only recorded: the model is the HFLM above, lm-eval's `--model hf` equivalent
                tasks=list(s.tasks),
                task_manager=manager,
                batch_size=s.batch_size,
                limit=s.limit,
                log_samples=s.log_samples,
            )
        except (ConnectionError, FileNotFoundError) as error:  # what `datasets` raises for data it cannot reach
            raise UsageError(
                f"a task's data set is not available: {error} (lm-eval's own tasks download theirs from the Hub, "
                f"or need it in the datasets cache offline; the local tasks {', '.join(LOCAL_TASKS)} need none)"
            ) from error
        except AssertionError as error:  # lm-eval checks its settings with asserts (a context too short, ...)
            raise UsageError(f"lm-eval refused the settings: {error or 'an assertion failed'} (see --max-length)")
    results["retnet_hf"] = {
        "folder": str(s.folder),
        "tasks": list(s.tasks),
        "max_length": lm.max_length,
        "dtype": str(model.dtype).replace("torch.", ""),
        "quantize": s.quantize,
        "batch_size": s.batch_size,
        "limit": s.limit,
        "device": str(model.device),
    }
    utils = require("lm_eval.utils", "eval")
    text = json.dumps(results, indent=2, default=utils.handle_non_serializable, ensure_ascii=False)
    model_folder.write_file_whole(output, text)
    results["retnet_hf"]["output"] = str(output)
    return results


def results_table(results: dict) -> str:
    """lm-eval's own markdown table of the results (and of the groups, if any)."""
    utils = require("lm_eval.utils", "eval")
    table = utils.make_table(results)
    if results.get("groups"):
        table += "\n" + utils.make_table(results, "groups")
    return table


def eval_command(settings: EvalSettings) -> None:
    """`retnet-hf eval`: lm-eval on a model folder (its HFLM and simple_evaluate): the results JSON, and lm-eval's
    table."""
    results = evaluate_folder(settings)
    used = results["retnet_hf"]
    print(results_table(results))
    print(
        f"evaluated {used['folder']} ({used['dtype']}, batch {used['batch_size']}, context {used['max_length']:,} "
        f"tokens{'' if used['limit'] is None else ', limit ' + str(used['limit'])}); results: {used['output']}"
    )


def sample_responses(results: dict) -> Dict[str, List[list]]:
    """`{task: [the filtered responses of each document, in document order]}` from results made with
    `log_samples=True` (loglikelihoods, rolling loglikelihoods, generated texts)."""
    return {
        task: [sample["filtered_resps"] for sample in sorted(samples, key=lambda sample: sample["doc_id"])]
        for task, samples in results.get("samples", {}).items()
    }


__all__ = [
    "EvalSettings",
    "LOCAL_TAG",
    "LOCAL_TASKS",
    "UNBOUNDED_CONTEXT",
    "context_length",
    "eval_command",
    "evaluate_folder",
    "lm_eval_model",
    "results_table",
    "sample_responses",
    "task_manager",
    "write_local_tasks",
]
