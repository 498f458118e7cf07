"""What a client may send, derived from the models served unless a setting says otherwise.

Fixed defaults are wrong at both ends: 256 MB of message is 2,000 times what the digits model can
use, and 4096² pixels is a small image for a model of 1024² inputs. So a setting of 0 means "derived":

- image pixels: 64 times the model's input area (8 times each side), at least 1024² (photos of
  digits are still photos), at most 4096²;
- image bytes: 3 bytes per allowed pixel (an 8-bit RGB image stored raw), at most 16 MiB;
- gRPC message received: the larger of two FP32 batches and two largest images, plus 64 KiB of
  headers, over the model versions on disk when the server starts;
- gRPC message sent: the largest valid response (every output of a full batch in FP32) plus 64 KiB.

Image limits are per model version; the message limits are per server (gRPC fixes them when it
starts): a version loaded later that needs more is logged, and its settings can be raised.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from convserve.contract import ContractError, ModelCard, model_names, version_dir, versions

from ..settings import Settings
from .preprocess import ImageLimits

log = logging.getLogger(__name__)

MIN_PIXELS = 1024 * 1024
MAX_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 16 * 1024 * 1024
HEADROOM = 64 * 1024
AREA_FACTOR = 64


def image_limits(card: ModelCard, settings: Settings) -> ImageLimits:
    """The image limits of one model version: the settings where given, else derived from its input."""
    _, height, width = card.preprocess.input_shape
    pixels = settings.max_image_pixels or min(MAX_PIXELS, max(MIN_PIXELS, AREA_FACTOR * height * width))
    image_bytes = settings.max_image_bytes or min(MAX_IMAGE_BYTES, 3 * pixels)
    return ImageLimits(settings.image_format_list(), image_bytes, pixels)


@dataclass(frozen=True)
class MessageLimits:
    receive: int
    send: int


def largest_messages(card: ModelCard, settings: Settings) -> MessageLimits:
    """What the largest valid request and response of one model version take on the wire."""
    batch = settings.max_batch_size
    tensor = 4 * int(np.prod(card.preprocess.input_shape))
    images = image_limits(card, settings).max_bytes
    outputs = sum(4 * int(np.prod(o.shape[1:])) for o in card.outputs)
    return MessageLimits(max(2 * batch * tensor, 2 * images) + HEADROOM, batch * outputs + HEADROOM)


def message_limits(cards: Iterable[ModelCard], settings: Settings) -> MessageLimits:
    """The server's gRPC message limits: the settings where given, else what the cards need (at
    least what a server with no models yet needs for a digits-sized model: 1 MiB)."""
    receive = send = 1024 * 1024
    for card in cards:
        need = largest_messages(card, settings)
        receive, send = max(receive, need.receive), max(send, need.send)
    return MessageLimits(settings.max_message_bytes or receive, settings.max_message_bytes or send)


def cards_on_disk(repository: str) -> list[ModelCard]:
    """Every readable model card in the repository (unreadable ones are the registry's to report)."""
    cards: list[ModelCard] = []
    if not os.path.isdir(repository):
        return cards
    for name in model_names(repository):
        for version in versions(os.path.join(repository, name)):
            try:
                cards.append(ModelCard.read(version_dir(repository, name, version)))
            except (ContractError, OSError, ValueError):
                continue
    return cards
