"""The main job on embedded defaults: backdoor a small Fashion-MNIST classifier (BadNets), then
sanitize it with `baerase sanitize` and compare the true trigger's success before and after.

    python -m bench.demo --out demo-out
"""

import argparse
from pathlib import Path

import torch

from app.cli import main as baerase
from bench.attacks import BadNets
from bench.datasets import fashion_mnist
from bench.metrics import evaluate
from bench.train import backdoored_fashion_mnist, save_samples


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # 2 x 2: on Fashion-MNIST a 3 x 3 square's verdict sits near the flagging line (see
    # tests/conftest.py and docs/method.md); the demo shows the whole path, unlearning included.
    attack = BadNets(target=0, size=2)
    model_path, samples_path = out / "backdoored.pt", out / "clean_samples.npz"
    print("training a backdoored small CNN on 40,000 Fashion-MNIST images (BadNets 2 x 2, target 0)...")
    model = backdoored_fashion_mnist("small_cnn", attack, train_size=40_000, epochs=3)
    torch.jit.save(torch.jit.script(model), str(model_path))
    x, y = fashion_mnist("train")
    save_samples(samples_path, x[50_000:53_000], y[50_000:53_000])  # the defender's 3,000 clean images

    code = baerase(["sanitize", str(model_path), "--samples", str(samples_path), "--out", str(out / "sanitized")])
    if code:
        raise SystemExit(code)
    xt, yt = fashion_mnist("test")
    sanitized = torch.jit.load(str(out / "sanitized" / "backdoored.sanitized.pt"))
    for name, m in (("before", model), ("after", sanitized)):
        metrics = evaluate(m, attack, xt, yt)
        print(f"{name}: clean accuracy {metrics['ca']:.2%}, true trigger ASR {metrics['asr']:.2%}")
    print(f"sanitized model, report and trigger images: {out / 'sanitized'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    run(parser.parse_args().out)
