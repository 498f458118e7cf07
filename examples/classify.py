"""Classify the example digits with a running server and look at one feature map, from Python.

make serve                            # in one terminal
.venv/bin/python examples/classify.py # in another (--url HOST:PORT for another server)
"""

import argparse
import asyncio
import glob
import os

from convserve.client import AsyncClient, Client

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="127.0.0.1:8001")
    url = parser.parse_args().url
    images = sorted(glob.glob(os.path.join(HERE, "digits", "*.png")))
    with Client(url) as client:
        print([f"{m.name}/{m.version} {m.state}" for m in client.models()])
        results = client.classify(images, "digits", top_k=3, feature_maps=["conv1"])
        for path, result in zip(images, results):
            best = result.top_k[0]
            conv1 = result.feature_maps["conv1"]  # (channels, height, width) for this image
            print(f"{os.path.basename(path)}: {best.label} ({best.probability:.1%}); conv1 {conv1.shape}")
        print("request metrics:", results[0].metrics)

    async def the_same_with_asyncio() -> None:
        async with AsyncClient(url) as client:
            result = (await client.classify(images[:1], "digits"))[0]
            print("asyncio:", os.path.basename(images[0]), "->", result.label)

    asyncio.run(the_same_with_asyncio())


if __name__ == "__main__":
    main()
