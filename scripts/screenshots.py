"""Regenerate docs/screenshots/*.png: each dashboard page, on the shipped tiny model and the quickstart data.

    .venv/bin/python scripts/screenshots.py            # needs the serve and dev extras and Debian's chromium

Starts `tunekit serve` (in this process, a temporary --data-dir) on models/tiny-chat, uploads a file with a few
broken lines and the quickstart's train/valid files through the browser, trains a short LoRA job from the Jobs
page, then chats with it and compares it with the base. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart"
OUT = REPO / "docs" / "screenshots"


def start_server(data_dir: Path) -> tuple[object, str]:
    import socket

    import uvicorn

    from tunekit.serve.app import ServeSettings, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(ServeSettings(models=[f"tiny-chat={REPO / 'models' / 'tiny-chat'}"], port=port,
                                   data_dir=data_dir, device="cpu"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def blank(image) -> str | None:
    """Why a screenshot (a PIL image) shows nothing, or None: a frame not painted yet comes out one flat colour
    (a 1.5 KB PNG), which would be published as a page of nothing."""
    pixels = image.width * image.height
    colours = image.convert("RGB").getcolors(pixels) or []
    top = max((count for count, _ in colours), default=pixels)
    if len(colours) < 4 or top > 0.999 * pixels:
        return f"{len(colours)} colour(s), {100 * top / pixels:.1f}% of it one colour"
    return None


def broken_file(folder: Path) -> Path:
    """Five quickstart examples with three kinds of mistakes mixed in."""
    lines = (QUICKSTART / "train.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    bad = json.loads(lines[0])
    bad["messages"][2]["tool_calls"] = [{"type": "function", "function": {"name": "lookup", "arguments": "{city"}}]
    lines[1] = json.dumps(bad)
    lines[3] = lines[3][:-2]  # cut JSON
    wrong_role = json.loads(lines[0])
    wrong_role["messages"][1]["role"] = "customer"
    lines.append(json.dumps(wrong_role))
    path = folder / "recipes-draft.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the screenshot job")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server, origin = start_server(tmp / "data")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True)
            page = browser.new_page(viewport={"width": 1180, "height": 820})
            page.set_default_timeout(1_200_000)  # a shared CPU can make the job take minutes

            def shot(name: str, full: bool = False, element: str | None = None) -> None:
                from PIL import Image  # Pillow: installed with matplotlib

                path = OUT / f"{name}.png"
                for wait_ms in (200, 1_000, 3_000, 10_000):  # a frame can take a moment to paint
                    page.wait_for_timeout(wait_ms)
                    if element:  # one element (a frame: full-page shots leave sandboxed frames blank in chromium)
                        page.locator(element).screenshot(path=str(path))
                    else:
                        page.screenshot(path=str(path), full_page=full)
                    why = blank(Image.open(path))
                    if why is None:
                        break
                else:
                    path.unlink()
                    raise SystemExit(f"docs/screenshots/{name}.png came out blank ({why}) after 14 s: the page "
                                     f"did not paint{' ' + element if element else ''}; its file is removed")
                # 64 colours, no dithering: a third of the size, the flat UI colours unchanged to the eye
                Image.open(path).convert("RGB").quantize(colors=64, dither=Image.Dither.NONE).save(path, optimize=True)
                print(f"docs/screenshots/{name}.png {path.stat().st_size // 1024} KB")

            page.goto(origin + "/#/data")
            page.wait_for_selector("#stats-model")
            page.fill("#stats-max-len", "128")
            for path in (QUICKSTART / "valid.jsonl", QUICKSTART / "train.jsonl", broken_file(tmp)):
                page.set_input_files("#file-input", str(path))
                page.wait_for_selector(f"#report:has(h2:has-text('{path.name}')) #verdict")
            page.wait_for_selector("#report #preview")
            shot("data-errors")
            page.locator("#files tbody tr").filter(has_text="train.jsonl").get_by_role("button", name="Report").click()
            page.wait_for_selector("#report:has(h2:has-text('train.jsonl')) #preview")
            page.evaluate("document.querySelector('#facts').scrollIntoView()")
            shot("data-report")

            files = {row.locator("td").nth(0).inner_text(): row.get_attribute("data-file")
                     for row in page.locator("#files tbody tr").all()}
            page.goto(origin + "/#/jobs")
            page.wait_for_selector("#job-form")
            page.select_option("select[name=training_file]", files["train.jsonl"])
            page.select_option("select[name=validation_file]", files["valid.jsonl"])
            page.fill("input[name=batch_size]", "8")
            page.fill("input[name=learning_rate_multiplier]", "10")  # 10 x LoRA's 2e-4, the quickstart's lr
            page.fill("input[name=suffix]", "recipes")
            page.click("details summary")
            overrides = {"data.max_len": 256, "lora": {"r": 16, "alpha": 32},
                         "train": {"max_steps": args.steps, "threads": "auto"},
                         "eval": {"limit": 4, "max_new_tokens": 40, "baselines": ["base", "few-shot:3"]}}
            page.fill("textarea[name=tunekit]", json.dumps(overrides))
            shot("jobs-form")
            page.click("#job-form button[type=submit]")
            page.wait_for_selector("#loss-chart, main .error", timeout=30_000)
            if page.locator("main .error").count():
                raise SystemExit(f"the job was refused: {page.inner_text('main .error')}")
            page.wait_for_function("Number(document.querySelector('#loss-chart polyline.train')?.dataset.points) > 6")
            shot("job-running")
            page.wait_for_selector("#job-status:has-text('succeeded'), #job-status:has-text('failed')")
            page.frame_locator("#eval-report").locator("table").first.wait_for()  # the report, rendered
            model = page.inner_text("#ft-model")
            shot("job-done")
            shot("job-report", element="#eval-report")

            system = json.loads((QUICKSTART / "valid.jsonl").read_text(encoding="utf-8").splitlines()[0])
            system = system["messages"][0]["content"]
            recipe = ("Banana Oat Muffins\n\nIngredients:\n- 2 cups whole wheat flour\n- 1 cup rolled oats\n"
                      "- 1/2 cup packed brown sugar\n- 2 large eggs, beaten")
            page.goto(origin + f"/#/playground?model={model}")
            page.wait_for_selector("#pg-model")
            page.fill("#pg-system", system)
            page.fill("#pg-temperature", "0")
            page.fill("#pg-max-tokens", "48")
            page.fill("#pg-input", recipe)
            page.click("#pg-send")
            page.wait_for_selector(".msg.assistant[data-done]")
            shot("playground")

            page.goto(origin + f"/#/compare?models=tiny-chat,{model}")
            page.wait_for_selector("#cmp-model-1")
            page.fill("#cmp-prompt", recipe)
            page.fill("#cmp-system", system)
            page.fill("#cmp-max-tokens", "48")
            page.click("#cmp-run")
            page.wait_for_selector("#cmp-out-0[data-done]")
            page.wait_for_selector("#cmp-out-1[data-done]")
            shot("compare")
            browser.close()
        server.should_exit = True


if __name__ == "__main__":
    main()
