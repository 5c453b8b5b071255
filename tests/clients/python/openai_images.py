"""OpenAI's Python SDK (the `openai` package from PyPI) against `pixart serve`'s `/v1/` routes.

    PIXART_URL=http://127.0.0.1:8000 PIXART_KEY=secret \\
        tests/clients/python/.venv/bin/python tests/clients/python/openai_images.py

The server must run with `--api-key $PIXART_KEY`. Checks: the model list; `images.generate` with
`b64_json` and with `url` (PNG of the requested size, fetched by URL); the same request through
fal's client (`/run/`, same seed) gives the same bytes; our own fields through `extra_body`, fal's
queue headers through `extra_headers`;
errors in OpenAI's shape raised as the SDK's own exceptions (400 naming `n`, an unknown field,
401 for a wrong key). Prints `ok NAME` per check; exits 1 on the first failure.
"""

import base64
import os
import struct
import sys

import fal_client
import fal_client.client as fc
import httpx
import openai

URL, KEY = os.environ["PIXART_URL"], os.environ["PIXART_KEY"]
APP = "fal-ai/pixart-sigma"


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def main():
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key=KEY, max_retries=0)

    ids = [m.id for m in client.models.list()]
    assert ids == [APP], ids
    print("ok models passed")

    extra = {"seed": 7, "num_inference_steps": 2, "guidance_scale": 3.0, "negative_prompt": "blurry"}
    inline = client.images.generate(model="pixart-sigma", prompt="a red fox", n=2, size="64x48",
                                    response_format="b64_json", quality="hd", style="vivid", extra_body=extra)
    pictures = [base64.b64decode(d.b64_json) for d in inline.data]
    assert len(pictures) == 2 and all(png_size(p) == (64, 48) for p in pictures), [png_size(p) for p in pictures]
    assert pictures[0] != pictures[1], "two images of one request are the same"
    print("ok b64_json passed")

    by_url = client.images.generate(prompt="a red fox", size="96x64", response_format="url", extra_body=extra)
    fetched = httpx.get(by_url.data[0].url)
    assert fetched.status_code == 200 and png_size(fetched.content) == (96, 64), (fetched.status_code, by_url)
    print("ok url passed")

    # The same request through fal's client: the same queue, the same image.
    os.environ["FAL_KEY"] = KEY
    fc.QUEUE_URL_FORMAT, fc.RUN_URL_FORMAT = f"{URL}/", f"{URL}/run/"
    fal = fal_client.run(APP, arguments={"prompt": "a red fox", "num_images": 2, "sync_mode": True,
                                         "image_size": {"width": 64, "height": 48}, **extra})
    same = [base64.b64decode(i["url"].split(";base64,", 1)[1]) for i in fal["images"]]
    assert same == pictures, "fal's /run/ and OpenAI's route gave different images for one request"
    print("ok same_as_fal passed")

    try:
        client.images.generate(prompt="a red fox", n=9)
        raise AssertionError("n=9 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "n" and e.body["type"] == "invalid_request_error", e.body
    try:
        client.images.generate(prompt="a red fox", extra_body={"bogus": 1})
        raise AssertionError("an unknown field was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "bogus" and "unknown field" in e.body["message"], e.body
    # fal's queue headers hold here too.
    low = client.images.generate(prompt="a red fox", size="32x32", extra_headers={"x-fal-queue-priority": "low"},
                                 extra_body={"num_inference_steps": 1})
    assert len(low.data) == 1
    try:
        client.images.generate(prompt="a red fox", extra_headers={"x-fal-queue-priority": "urgent"})
        raise AssertionError("an unknown priority was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "x-fal-queue-priority", e.body
    try:
        openai.OpenAI(base_url=f"{URL}/v1", api_key="wrong", max_retries=0).models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.body["type"] == "authentication_error", e.body
    print("ok errors passed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)
