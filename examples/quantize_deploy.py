"""Quantize and deploy: the article's Quantizer snippet on a trained CNN, with size, latency and accuracy.

Trains the digits CNN in float, then quantizes it with the article's configuration (4-bit weights, 8-bit dynamic
activations), with W8A8, and as static int8 models (W8A8 and W4A8 calibrated on training images: activations stay
int8 between layers), and reports, side by side: test accuracy (and its drop), checkpoint size, and batch-1 latency.
Latency is also measured on a ResNet-18 with random weights (the article's claim is ResNet-50 on a Raspberry Pi:
120 ms -> 35 ms with 0.8% accuracy loss; this prints what this machine measures).

    python examples/quantize_deploy.py [--quick] [--out demo-output]
"""

from __future__ import annotations

import torch
from _common import DigitsCNN, digits_images, median_time, parser, progress, resnet18, save_results, state_dict_bytes
from torch import nn

from deepseek_ext.quant import QuantConfig, Quantizer


def train_cnn(epochs: int, seed: int):
    x, y = digits_images()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    test, train = perm[:400], perm[400:]
    calibration = [x[train[i : i + 64]] for i in range(0, 512, 64)]
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in progress(range(epochs), desc="training the float CNN"):
        for idx in torch.randperm(len(train), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[train[idx]]), y[train[idx]]).backward()
            opt.step()
    return model.eval(), (x[test], y[test]), calibration


def accuracy(model, data) -> float:
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item()


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    model, test, calibration = train_cnn(4 if args.quick else 30, args.seed)
    configs = {
        "W4A8": QuantConfig(weight_bits=4, activation_bits=8, method="dynamic"),  # the article's configuration
        "W8A8": QuantConfig(weight_bits=8, activation_bits=8, method="dynamic"),
        "W8A8 static": QuantConfig(weight_bits=8, activation_bits=8, method="static"),
        "W4A8 static": QuantConfig(weight_bits=4, activation_bits=8, method="static"),
    }

    def quantize(net, config, batches):
        quantizer = Quantizer(net, config)
        quantized = quantizer.quantize()
        if config.method == "static":
            quantizer.calibrate(batches, len(batches), model=quantized)
        return quantized

    one = test[0][:1]
    results = {"digits_cnn": {"float": {"accuracy": accuracy(model, test), "bytes": state_dict_bytes(model)}}}
    with torch.no_grad():
        results["digits_cnn"]["float"]["latency_ms"] = median_time(lambda: model(one)) * 1e3
        for name, config in configs.items():
            quantized_model = quantize(model, config, calibration)
            results["digits_cnn"][name] = {
                "accuracy": accuracy(quantized_model, test),
                "bytes": state_dict_bytes(quantized_model),
                "latency_ms": median_time(lambda m=quantized_model: m(one)) * 1e3,
            }
        side = 112 if args.quick else 224
        torch.manual_seed(args.seed)
        net = resnet18().eval()
        image = torch.randn(1, 3, side, side)
        results["resnet18"] = {
            "image": side,
            "float": {"latency_ms": median_time(lambda: net(image), 5) * 1e3, "bytes": state_dict_bytes(net)},
        }
        images = [torch.randn(2, 3, side, side) for _ in range(2)]
        for name, config in configs.items():
            q = quantize(net, config, images)
            results["resnet18"][name] = {
                "latency_ms": median_time(lambda m=q: m(image), 5) * 1e3,
                "bytes": state_dict_bytes(q),
            }
    base = results["digits_cnn"]["float"]
    print(f"{'model':<22} {'accuracy':>9} {'drop':>7} {'size':>10} {'batch-1 latency':>16}")
    for name, r in results["digits_cnn"].items():
        drop = base["accuracy"] - r["accuracy"]
        r["accuracy_drop"] = drop
        print(
            f"digits CNN {name:<11} {r['accuracy']:>9.3f} {drop:>+7.3f} {r['bytes'] / 1024:>8.1f}KB "
            f"{r['latency_ms']:>14.3f}ms"
        )
    for name, r in results["resnet18"].items():
        if name != "image":
            print(
                f"ResNet-18 {name:<12} {'':>9} {'':>7} {r['bytes'] / 2**20:>8.1f}MB {r['latency_ms']:>14.1f}ms "
                f"({side}x{side})"
            )
    save_results(args.out, "quantize_deploy", results)
    return results


if __name__ == "__main__":
    main()
