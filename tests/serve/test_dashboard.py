"""The dashboard at `/`, driven in a real browser (Debian's chromium through Playwright), and the two tunekit
extension endpoints it reads (`/v1/files/{id}/check`, `/v1/files/{id}/preview`), driven with the openai SDK.

A live server serves the tiny Llama of conftest with a temporary --data-dir; the browser uploads files, creates
a job of a few steps, watches its loss curve grow, chats with the fine-tuned model and compares it with the
base. Browser tests skip where chromium is absent, except under CI (CI=true), where they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest

openai = pytest.importorskip("openai", reason="tunekit serve tests need the serve extra: pip install -e '.[serve]'")
pytest.importorskip("multipart", reason="uploads need python-multipart (the serve extra)")

from conftest import greedy  # noqa: E402
from live_server import serving  # noqa: E402
from test_finetune import QUESTION, sdk, tiny_job, toy_jsonl, upload  # noqa: E402

STEPS = 300  # at most, in the job of the browser test: a few seconds, so the page shows the curve growing
CHROMIUM = os.environ.get("TUNEKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# line 2: not JSON; line 3: a message without content; line 4: an unknown role; then 10 valid examples
BROKEN = (b'{"messages": [{"role": "user", "content": "say apple"}, {"role": "assistant", "content": "apple"}]}\n'
          b'{"messages": [\n'
          b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n'
          b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
          + toy_jsonl(10, 5))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    data_dir = tmp_path_factory.mktemp("dash-data")
    with serving(models=[f"tiny={tiny_llama_dir}"], data_dir=data_dir) as (url, app):
        yield url, app


# --------------------------------------------------------------------------------------------------
# Extension endpoints (openai SDK: client.get on a path the SDK has no method for)


def get(client, path: str) -> dict:
    return client.get(path, cast_to=object)


def test_check_endpoint_reports_lines_fields_counts_and_token_stats(server, tiny_llama_dir):
    from tunekit.data.check import check_file
    from tunekit.model import load_tokenizer

    url, _ = server
    client = sdk(url)
    f = upload(client, BROKEN, name="broken.jsonl")
    assert f.status == "error"
    report = get(client, f"/files/{f.id}/check")
    assert (report["ok"], report["lines"], report["examples"], report["path"]) == (False, 14, 11, "broken.jsonl")
    errors = [(p["line"], p["path"], p["code"]) for p in report["problems"] if p["severity"] == "error"]
    assert [e[0] for e in errors] == [2, 3, 4], errors
    assert errors[0][2] == "invalid_json" and errors[1][1] == "messages[1].content" and errors[2][1] == "messages[0].role"
    assert all(p["hint"] and p["file"] == "broken.jsonl" for p in report["problems"])
    assert report["counts"]["invalid_json"] == 1 and report["stats"]["unit"] == "characters"

    with_tokens = get(client, f"/files/{f.id}/check?model=tiny&max_len=16")
    path = tiny_llama_dir.parent / "broken.jsonl"
    path.write_bytes(BROKEN)
    expected = check_file(path, tokenizer=load_tokenizer(str(tiny_llama_dir)), max_len=16).to_dict()["stats"]
    assert with_tokens["stats"] == expected and expected["unit"] == "tokens" and expected["over_max_len"] > 0
    assert with_tokens["stats"]["epochs"] == 10  # the cookbook rule: ceil(100 / 11)


def test_check_with_a_model_writes_the_data_cache_once_and_reads_it_after(server, tiny_llama_dir):
    """The report's token statistics come through the rendered-data cache that training reads: the first
    report writes the entry, the second reads it (no new entry) and says the same; both equal the CLI's."""
    from tunekit.data import cache
    from tunekit.data.check import check_file
    from tunekit.model import load_tokenizer

    url, _ = server
    client = sdk(url)
    data = toy_jsonl(17, 4242)  # contents no other test uploads
    f = upload(client, data, name="cached.jsonl")
    before = {e.key for e in cache.entries(cache.default_dir())}
    first = get(client, f"/files/{f.id}/check?model=tiny")
    written = {e.key for e in cache.entries(cache.default_dir())} - before
    assert len(written) == 1 and first["stats"]["unit"] == "tokens" and first["ok"]
    again = get(client, f"/files/{f.id}/check?model=tiny")
    assert {e.key for e in cache.entries(cache.default_dir())} - before == written
    assert again["stats"] == first["stats"]
    path = tiny_llama_dir.parent / "cached.jsonl"
    path.write_bytes(data)
    assert check_file(path, tokenizer=load_tokenizer(str(tiny_llama_dir)), cache=False).to_dict()["stats"] == first["stats"]


def test_preview_endpoint_marks_exactly_the_trained_tokens(server, tiny_llama_dir):
    from tunekit.data.render import render_example
    from tunekit.model import load_tokenizer

    url, _ = server
    client = sdk(url)
    f = upload(client, BROKEN, name="broken.jsonl")
    preview = get(client, f"/files/{f.id}/preview?model=tiny&n=2")
    assert [item["line"] for item in preview["data"]] == [1, 5] and preview["skipped"] == 3
    first = preview["data"][0]
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    (sequence,) = render_example(json.loads(BROKEN.splitlines()[0]), tokenizer)
    (runs,) = first["sequences"]
    assert "".join(r["text"] for r in runs) == tokenizer.decode(sequence.input_ids, skip_special_tokens=False)
    trained = "".join(r["text"] for r in runs if r["trained"])
    assert trained.startswith("apple") and "<|im_end|>" in trained and "say apple" not in trained
    assert (first["tokens"], first["trained"]) == (len(sequence), sequence.num_trained)


def test_preview_endpoint_shows_a_pair_with_both_replies_marked(server, tiny_llama_dir):
    """A preference pair previews as two sequences, named, whose trained runs are exactly each reply's tokens."""
    from tunekit.data.preference import pair_sequences, render_pair
    from tunekit.model import load_tokenizer

    url, _ = server
    client = sdk(url)
    record = {"input": {"messages": [{"role": "user", "content": "say apple"}]},
              "preferred_output": [{"role": "assistant", "content": "apple apple"}],
              "non_preferred_output": [{"role": "assistant", "content": "stone"}]}
    f = upload(client, (json.dumps(record) + "\n").encode(), name="pairs.jsonl")
    (item,) = get(client, f"/files/{f.id}/preview?model=tiny&n=1")["data"]
    assert item["titles"] == ["preferred reply", "non-preferred reply"]
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    chosen, rejected = pair_sequences(render_pair(record, tokenizer))
    for runs, sequence, reply in zip(item["sequences"], (chosen, rejected), ("apple apple", "stone"), strict=True):
        assert "".join(r["text"] for r in runs) == tokenizer.decode(sequence.input_ids, skip_special_tokens=False)
        assert "".join(r["text"] for r in runs if r["trained"]) == reply + "<|im_end|>"
    assert (item["tokens"], item["trained"]) == (len(chosen) + len(rejected), chosen.num_trained + rejected.num_trained)


def test_extension_endpoints_refuse_bad_input_with_4xx(server):
    url, _ = server
    client = sdk(url)
    f = upload(client, toy_jsonl(10, 2))
    cases = [("/files/file-nope/check", 404, "file_id"), (f"/files/{f.id}/check?model=nope", 404, "model"),
             (f"/files/{f.id}/check?max_len=0", 400, "query.max_len"), (f"/files/{f.id}/preview", 400, "query.model"),
             (f"/files/{f.id}/preview?model=tiny&n=100", 400, "query.n"), (f"/files/{f.id}/preview?model=nope", 404, "model")]
    for path, status, param in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            get(client, path)
        assert caught.value.status_code == status, path
        assert caught.value.body["param"] == param, (path, caught.value.body)


# --------------------------------------------------------------------------------------------------
# In the browser


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        reason = (f"no chromium at {CHROMIUM}: install it with `apt-get install -y chromium` "
                  "(or set TUNEKIT_CHROMIUM to its path)")
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: .ci/run installs it)")
        pytest.skip(reason)
    sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (the dev extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    url, _ = server
    origin = url.removesuffix("/v1")
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    outside, console_errors = [], []
    page.on("request", lambda r: r.url.startswith((origin, "data:", "about:")) or outside.append(r.url))
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.origin = origin
    yield page
    context.close()
    assert outside == [], f"the dashboard fetched from outside the server: {outside}"
    assert console_errors == [], console_errors


def test_broken_upload_shows_its_line_errors(page, tmp_path):
    page.goto(page.origin + "/#/data")
    page.wait_for_selector("#files-empty, #files")
    path = tmp_path / "broken.jsonl"
    path.write_bytes(BROKEN)
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector("#problems")
    assert "3 error(s)" in page.inner_text("#verdict")
    rows = page.locator("#problems tbody tr.sev-error")
    assert rows.count() == 3
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(3)]
    assert [c[0] for c in cells] == ["2:15", "3", "4"] or [c[0].split(":")[0] for c in cells] == ["2", "3", "4"]
    assert cells[2][1] == "messages[0].role" and all(c[4] for c in cells)  # field and hint shown
    assert "invalid_json" in page.inner_text("#counts")
    row = page.locator("#files tbody tr").filter(has_text="broken.jsonl").first
    assert row.locator(".badge").inner_text() == "error"
    file_id = row.get_attribute("data-file")
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete broken.jsonl?"
    row.get_by_role("button", name="delete broken.jsonl").click()
    page.wait_for_selector(f"tr[data-file='{file_id}']", state="detached")
    assert not page.locator("#report #problems").count()  # its report went with it


def test_api_key_is_asked_once_and_kept_for_the_session(browser, tiny_llama_dir):
    with serving(models=[f"tiny={tiny_llama_dir}"], api_keys=["secret"]) as (url, _):
        context = browser.new_context()
        # count every time a dialog opens (the key dialog is the page's only modal one)
        context.add_init_script("window.__modals = 0; const open = HTMLDialogElement.prototype.showModal;"
                                "HTMLDialogElement.prototype.showModal = function () { window.__modals += 1;"
                                " return open.call(this); };")
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url.removesuffix("/v1") + "/#/jobs")  # two requests refused at once: one question
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "secret")
        page.click("#key-save")
        page.wait_for_selector("#no-training-files")
        assert page.evaluate("window.__modals") == 1
        assert "start it with --data-dir" in page.inner_text("main .error")  # this server keeps no jobs
        page.goto(url.removesuffix("/v1") + "/#/playground")
        page.wait_for_selector("#pg-model")
        assert page.locator("#pg-model option").all_inner_texts() == ["tiny"]
        page.goto(url.removesuffix("/v1") + "/#/compare")  # another page, same tab: no second question
        page.wait_for_selector("#cmp-model-0")
        assert not page.locator("#key-dialog[open]").count() and page.evaluate("window.__modals") == 1  # still one
        assert page.evaluate("sessionStorage.getItem('tunekit-api-key')") == "secret" and errors == []
        context.close()


def test_upload_train_watch_curve_chat_and_compare(page, server, tmp_path, tiny_llama_dir):
    url, _ = server
    client = sdk(url)
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train.write_bytes(toy_jsonl(24, 0))
    valid.write_bytes(toy_jsonl(10, 1))

    # Data: a good file, with token statistics and the trained-token preview
    page.goto(page.origin + "/#/data")
    page.wait_for_selector("#stats-model")
    page.set_input_files("#file-input", str(valid))
    page.wait_for_selector("#preview")
    page.fill("#stats-max-len", "20")
    page.set_input_files("#file-input", str(train))
    page.wait_for_selector("#report:has(h2:has-text('train.jsonl')) #preview")
    assert page.inner_text("#verdict").startswith("✓ no errors: 24 examples")
    facts = page.inner_text("#facts")
    assert "tokens per epoch" in facts and "24 examples over max length 20 (drop)" in facts, facts
    marks = page.locator("#preview .preview mark").all_inner_texts()
    word = marks[0].split()[0]
    assert marks[0].startswith(f"{word} {word} {word}") and len(marks) == 3  # one trained run per example

    # Jobs: create with "auto" epochs, a few steps through the advanced overrides
    files = {f.filename: f.id for f in client.files.list()}
    page.goto(page.origin + "/#/jobs")
    page.wait_for_selector("#job-form")
    page.select_option("select[name=training_file]", files["train.jsonl"])
    page.select_option("select[name=validation_file]", files["valid.jsonl"])
    page.fill("input[name=n_epochs]", "50")  # 50 epochs of one-row steps: a few seconds
    page.fill("input[name=batch_size]", "1")
    page.fill("input[name=learning_rate_multiplier]", "10")
    page.fill("input[name=seed]", "7")  # fixed: the tuned model's greedy reply is the same every run
    page.fill("input[name=suffix]", "dash")
    page.click("details summary")
    page.fill("textarea[name=tunekit]", json.dumps(tiny_job(max_steps=STEPS)["tunekit"]))
    page.click("#job-form button[type=submit]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]

    seen = set()  # points on the train curve, as the page showed them while the job ran
    checkpoints_while_running = 0  # most rows of the checkpoints table shown before the job ended
    deadline = time.monotonic() + 300
    while page.locator("#job-status").inner_text() not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the job page did not reach a final status"
        points = page.locator("#loss-chart polyline.train")
        if points.count():
            seen.add(int(points.get_attribute("data-points")))
        rows = page.locator("#checkpoints tbody tr").count()
        if page.locator("#job-status").inner_text() == "running":
            checkpoints_while_running = max(checkpoints_while_running, rows)
        time.sleep(0.1)
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert page.locator("#job-status").inner_text() == job.status == "succeeded", job.error
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (50, 1)
    assert (job.hyperparameters.learning_rate_multiplier, job.seed) == (10, 7)
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job_id, limit=1000) if e.type == "metrics"]
    steps = metrics[0]["total_steps"]  # 50 epochs of the packed rows (5 here), one row a step
    assert len(metrics) == steps and 200 <= steps <= STEPS
    page.wait_for_function(f"document.querySelector('#loss-chart polyline.train')?.dataset.points === '{steps}'")
    assert seen - {steps}, f"the curve did not grow while the job ran: {sorted(seen)}"
    assert int(page.get_attribute("#loss-chart polyline.valid", "data-points")) >= 1
    assert page.inner_text("#ft-model") == job.fine_tuned_model
    assert f'model="{job.fine_tuned_model}"' in page.inner_text("#sdk-snippet")
    page.wait_for_selector("#eval-report")  # the report's own HTML page, plots included, in a sandboxed frame
    report = page.frame_locator("#eval-report")
    assert "few-shot" in report.locator("table").first.inner_text()
    assert report.locator("img").count() >= 1
    assert page.locator("#checkpoints tbody tr").count() >= 1
    assert checkpoints_while_running >= 1  # shown when their events arrived, not only once the job ended
    assert "The job has successfully completed" in page.inner_text("#events")

    # Playground: a streamed reply of the fine-tuned model, greedy, equal to the SDK's
    page.click("text=try it in the playground")
    page.wait_for_selector("#pg-model")
    assert page.input_value("#pg-model") == job.fine_tuned_model
    page.fill("#pg-temperature", "0")
    page.fill("#pg-max-tokens", "12")
    page.fill("#pg-input", QUESTION[0]["content"])
    page.press("#pg-input", "Control+Enter")
    page.wait_for_selector(".msg.assistant[data-done]")
    reply = client.chat.completions.create(model=job.fine_tuned_model, messages=QUESTION, temperature=0,
                                           max_completion_tokens=12).choices[0].message.content
    shown = page.locator(".msg.assistant .text")
    assert shown.inner_text() == reply and reply
    pieces = shown.evaluate("el => el.childNodes.length")
    assert pieces >= 2, "the reply arrived in one piece, not streamed"
    assert "tokens" in page.inner_text(".msg.assistant .meta")

    # Compare: base and tuned side by side, each equal to its greedy answer, with tokens and latency
    page.goto(page.origin + f"/#/compare?models=tiny,{job.fine_tuned_model}")
    page.wait_for_selector("#cmp-model-1")
    assert page.input_value("#cmp-model-0") == "tiny" and page.input_value("#cmp-model-1") == job.fine_tuned_model
    page.fill("#cmp-prompt", QUESTION[0]["content"])
    page.fill("#cmp-max-tokens", "12")
    page.click("#cmp-run")
    page.wait_for_selector("#cmp-out-0[data-done]")
    page.wait_for_selector("#cmp-out-1[data-done]")
    base_text = page.inner_text("#cmp-out-0 .text")
    tuned_text = page.inner_text("#cmp-out-1 .text")
    assert tuned_text == reply
    assert base_text == greedy(tiny_llama_dir, QUESTION, 12)[0].removesuffix("<|im_end|>")
    assert base_text != tuned_text
    for i in (0, 1):
        meta = page.inner_text(f"#cmp-out-{i} .meta")
        assert "tokens" in meta and " ms" in meta, meta


def test_failed_job_shows_its_error_object(page, server):
    url, _ = server
    client = sdk(url)
    broken = upload(client, BROKEN, name="broken.jsonl")
    job = client.fine_tuning.jobs.create(model="tiny", training_file=broken.id, extra_body=tiny_job(max_steps=1))
    page.goto(page.origin + f"/#/jobs/{job.id}")
    page.wait_for_selector("#job-error")
    shown = page.inner_text("#job-error")
    assert shown.startswith("Failed (invalid_training_file)") and "line 2" in shown and "[training_file]" in shown
    assert page.inner_text("#job-status") == "failed"
    assert page.locator("main button:has-text('Cancel')").is_disabled()
    good = upload(client, toy_jsonl(10, 4), name="good.jsonl")
    page.goto(page.origin + "/#/jobs")  # the form offers checked files only
    page.wait_for_selector("#job-form")
    offered = page.locator("select[name=training_file] option").evaluate_all("os => os.map(o => o.value)")
    assert good.id in offered and broken.id not in offered
    assert page.locator(f"#jobs a[href='#/jobs/{job.id}']").count() == 1


def test_playground_shows_tool_calls_as_calls(page):
    """The page's reading of a streamed tool call, in the server's chunk layout (chat.py `_stream`: the call's
    id, type and name first, then its arguments). Whether a model's output becomes such chunks is tested in
    test_serve with a model trained to call a tool; here the stream is given, so no such model is trained."""
    from runs import WEATHER_TOOL

    def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [],
                "usage": usage}
        return f"data: {json.dumps(body)}\n\n"

    sent = []
    stream = (chunk({"role": "assistant", "content": ""})
              + chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": ""}}]})
              + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]})
              + chunk({}, "tool_calls") + chunk({}, usage={"prompt_tokens": 9, "completion_tokens": 7,
                                                           "total_tokens": 16}) + "data: [DONE]\n\n")

    def reply(route):
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=stream)

    page.route("**/v1/chat/completions", reply)
    page.goto(page.origin + "/#/playground")
    page.wait_for_selector("#pg-model")
    page.click("#pg-tools-fold summary")
    page.fill("#pg-tools", json.dumps([WEATHER_TOOL]))
    page.fill("#pg-input", "weather in Paris?")
    page.click("#pg-send")
    page.wait_for_selector(".msg.assistant[data-done]")
    assert page.inner_text(".msg.assistant .toolcall") == 'tool call get_weather({"city": "Paris"})'
    assert "7 tokens" in page.inner_text(".msg.assistant .meta") and "tool_calls" in page.inner_text(".msg.assistant .meta")
    assert sent[0]["tools"] == [WEATHER_TOOL] and sent[0]["stream"] is True
    page.fill("#pg-input", "and in London?")  # the call stays in the conversation sent next
    page.click("#pg-send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length === 2")
    assert sent[1]["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}


def test_pause_resume_cancel_buttons(page, server):
    url, _ = server
    client = sdk(url, strict=False)  # a paused job: a status the SDK's type lacks
    train = upload(client, toy_jsonl(24, 8))
    job = client.fine_tuning.jobs.create(model="tiny", training_file=train.id,
                                         hyperparameters={"n_epochs": 50, "batch_size": 1},
                                         extra_body=tiny_job())  # 1200 steps: still running when paused
    page.goto(page.origin + f"/#/jobs/{job.id}")
    page.wait_for_function("Number(document.querySelector('#loss-chart polyline.train')?.dataset.points) > 0")
    assert page.inner_text("#job-status") == "running"
    assert page.locator("main button:has-text('Resume')").is_disabled()
    page.click("main button:has-text('Pause')")
    page.wait_for_selector("#job-status:has-text('paused')")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert page.locator("main button:has-text('Pause')").is_disabled()
    page.click("main button:has-text('Resume')")
    page.wait_for_selector("#job-status:has-text('queued'), #job-status:has-text('running')")
    page.click("main button:has-text('Cancel')")
    page.wait_for_selector("#job-status:has-text('cancelled')")
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    for message in ("Pausing fine-tuning job", "Resuming fine-tuning job", "Fine-tuning job cancelled"):
        page.wait_for_selector(f"#events td:has-text('{message}')")


def test_every_page_loads_without_console_errors_or_failed_requests(browser, server):
    """A visit to each page, in a fresh browser context, logs no console error and no request fails or is
    answered 4xx/5xx: the browser's own requests included (a missing /favicon.ico is a console error)."""
    url, _ = server
    client = sdk(url)
    job = client.fine_tuning.jobs.create(model="tiny", training_file=upload(client, BROKEN, name="broken.jsonl").id,
                                         extra_body=tiny_job(max_steps=1))  # fails at once: its page shows the error
    origin = url.removesuffix("/v1")
    pages = {"data": "#files-empty, #files", "jobs": "#jobs-empty, #jobs", "playground": "#pg-model",
             "compare": "#cmp-model-0", f"jobs/{job.id}": "#job-status"}
    problems = []
    for path, shown in pages.items():
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(60_000)

        def seen(what: str, path: str = path) -> None:
            problems.append(f"#/{path}: {what}")

        page.on("console", lambda m, seen=seen: m.type == "error" and seen(f"console error {m.text!r} at {m.location['url']}"))
        page.on("pageerror", lambda e, seen=seen: seen(f"page error {e}"))
        page.on("requestfailed", lambda r, seen=seen: seen(f"request failed: {r.url} ({r.failure})"))
        page.on("response", lambda r, seen=seen: r.status >= 400 and seen(f"HTTP {r.status} for {r.url}"))
        page.goto(f"{origin}/#/{path}")
        page.wait_for_selector(shown)
        page.wait_for_load_state("networkidle")
        page.wait_for_timeout(500)  # what the browser asks for after the load (its icon) has come back
        context.close()
    assert problems == [], "\n".join(problems)


def test_dpo_job_from_the_form_shows_its_reward_chart(page, server):
    """Method dpo in the form: beta is checked before sending, a chat file is refused by the server (its 400
    shown), then a preference file trains a DPO job of 3 steps: the request carries OpenAI's DPO method object,
    the job echoes it, and the reward chart draws one point per step of accuracy and margin."""
    from test_jobs_dpo import pairs_jsonl, tiny

    url, _ = server
    client = sdk(url)
    pairs, valid = upload(client, pairs_jsonl(16, 10), "form-pairs.jsonl"), upload(client, pairs_jsonl(8, 11), "form-valid.jsonl")
    chats = upload(client, toy_jsonl(10, 12), name="form-chats.jsonl")
    sent = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/fine_tuning/jobs")
            and sent.append(json.loads(r.post_data)))
    page.goto(page.origin + "/#/jobs")
    page.wait_for_selector("#job-form")
    assert not page.locator("input[name=beta]").is_visible()  # supervised: no beta
    page.select_option("select[name=method]", "dpo")
    assert page.input_value("input[name=beta]") == "0.1"
    before = len(client.fine_tuning.jobs.list(limit=1000).data)

    page.fill("input[name=beta]", "2.5")  # out of (0, 2]: refused before sending
    page.click("#job-form button[type=submit]")
    error = page.inner_text("main .error")
    assert 'beta must be a number > 0 and <= 2, not "2.5"' in error and "method.dpo.hyperparameters.beta" in error
    assert sent == []

    page.fill("input[name=beta]", "0.5")
    page.select_option("select[name=training_file]", chats.id)  # chat data to a DPO job: the server's 400
    page.click("#job-form button[type=submit]")
    page.wait_for_selector("main .error:has-text('a DPO job trains on preference pairs')")
    assert "(training_file)" in page.inner_text("main .error") and len(sent) == 1
    assert len(client.fine_tuning.jobs.list(limit=1000).data) == before

    page.select_option("select[name=training_file]", pairs.id)
    page.select_option("select[name=validation_file]", valid.id)
    page.click("details summary")
    page.fill("textarea[name=tunekit]", json.dumps(tiny(max_steps=3)["tunekit"]))
    page.click("#job-form button[type=submit]")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]
    asked = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.5, "n_epochs": "auto", "batch_size": "auto",
                                                        "learning_rate_multiplier": "auto"}}}
    assert sent[-1]["method"] == asked and sent[-1]["training_file"] == pairs.id

    page.wait_for_selector("#job-status:has-text('succeeded'), #job-status:has-text('failed')", timeout=300_000)
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.5
    assert "dpo, beta 0.5" in page.inner_text("main .muted >> nth=0")
    metrics = sorted((e.data for e in client.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"),
                     key=lambda d: d["step"])
    assert [d["step"] for d in metrics] == [1, 2, 3]
    page.wait_for_function("document.querySelector('#reward-chart polyline[data-key=train_reward_margin]')"
                           "?.dataset.points === '3'")
    drawn = {key: int(page.get_attribute(f"#reward-chart polyline[data-key={key}]", "data-points"))
             for key in ("train_reward_accuracy", "train_reward_margin", "valid_reward_accuracy", "valid_reward_margin")}
    valid_steps = sum(d["valid_reward_accuracy"] is not None for d in metrics)
    assert drawn == {"train_reward_accuracy": 3, "train_reward_margin": 3,
                     "valid_reward_accuracy": valid_steps, "valid_reward_margin": valid_steps} and valid_steps >= 1
    assert page.locator("#reward-chart circle.dot.valid").count() == 2 * valid_steps
    assert page.get_attribute("#loss-chart polyline.train", "data-points") == "3"  # the loss chart beside it
    # each point sits at its step and value, on the axes the loss chart's code computes (viewBox 640 x 240)
    keys = ("train_reward_accuracy", "train_reward_margin", "valid_reward_accuracy", "valid_reward_margin")
    values = [d[k] for d in metrics for k in keys if d[k] is not None]
    y0, y1 = min(values), max(values)
    y0, y1 = y0 - (y1 - y0) * 0.05, y1 + (y1 - y0) * 0.05
    for key in ("train_reward_accuracy", "train_reward_margin"):
        drawn_xy = [float(c) for xy in page.get_attribute(f"#reward-chart polyline[data-key={key}]", "points").split()
                    for c in xy.split(",")]
        expected = [c for d in metrics for c in (48 + (d["step"] - 1) / 2 * (640 - 48 - 12),
                                                 14 + (1 - (d[key] - y0) / (y1 - y0)) * (240 - 14 - 30))]
        assert drawn_xy == pytest.approx(expected, abs=0.051), key


def test_eval_created_run_compared_and_failed_samples_opened(page, server):
    """An eval made on the Evals page from an uploaded evals file and a typed grader, run on the served model:
    the comparison table shows the API's counts and pass rate, and the worst samples are the API's failed items."""
    url, _ = server
    client = sdk(url)
    # "like" with an empty reference passes any answer; the two odd references appear in no answer of 8 tokens
    answers = ["", "qqq-never-said-1", "", "qqq-never-said-2", ""]
    rows = [{"item": {"question": f"say {w}", "answer": a}} for w, a in zip(["apple", "river", "stone", "cloud", "green"], answers, strict=True)]
    # purpose "evals" is missing from the SDK's FileObject literal: upload with a lenient client
    f = sdk(url, strict=False).files.create(file=("capitals.jsonl", "\n".join(json.dumps(r) for r in rows).encode()),
                                            purpose="evals")
    page.goto(page.origin + "/#/evals")
    page.wait_for_selector("#eval-form")
    page.select_option("#ev-file", f.id)
    page.wait_for_function("document.querySelector('#ev-schema').value.includes('answer')")
    assert json.loads(page.input_value("#ev-schema")) == {
        "type": "object", "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"]}
    assert json.loads(page.input_value("#ev-grader"))["type"] == "string_check"  # the default grader
    page.fill("#ev-name", "contains")
    page.fill("#ev-grader", json.dumps({"type": "string_check", "name": "contains", "input": "{{sample.output_text}}",
                                        "reference": "{{item.answer}}", "operation": "like"}))
    page.click("#ev-create")
    page.wait_for_selector("#run-form")
    eval_id = page.evaluate("location.hash").split("/")[-1]
    ev = client.evals.retrieve(eval_id)
    assert ev.name == "contains" and [c.name for c in ev.testing_criteria] == ["contains"]
    assert page.input_value("#run-file") == f.id and json.loads(page.input_value("#run-template")) == [
        {"role": "user", "content": "{{item.question}}"}]

    page.select_option("#run-model", "tiny")
    page.fill("#run-max-tokens", "8")
    page.click("#run-start")
    page.wait_for_selector("#runs tr[data-run] .badge:has-text('completed')", timeout=120_000)
    (run,) = client.evals.runs.list(eval_id)
    assert run.status == "completed" and run.model == "tiny" and run.data_source.source.id == f.id
    counts = run.result_counts
    row = page.locator(f"#runs tr[data-run='{run.id}']")
    shown = {k: int(row.locator(f"td.{k}").inner_text()) for k in ("total", "passed", "failed", "errored")}
    assert shown == counts.model_dump() and counts.total == 5 and counts.errored == 0
    assert counts.passed >= 3 and counts.failed >= 2  # the empty references pass; the never-said ones fail
    (per,) = run.per_testing_criteria_results
    assert row.locator("td.rate").inner_text() == f"{100 * per.passed / (per.passed + per.failed):.1f}".rstrip("0").rstrip(".") + "%"

    row.get_by_role("button", name=f"worst samples of {run.id}").click()
    page.wait_for_selector("#worst")
    failed = list(client.evals.runs.output_items.list(run.id, eval_id=eval_id, status="fail"))
    shown_rows = page.locator("#worst tbody tr")
    assert shown_rows.count() == len(failed) == counts.failed
    by_id = {i.id: i for i in failed}
    for k in range(shown_rows.count()):
        tr = shown_rows.nth(k)
        item = by_id[tr.get_attribute("data-item")]
        cells = tr.locator("td")
        assert json.loads(cells.nth(2).inner_text()) == item.datasource_item
        assert item.datasource_item["answer"].startswith("qqq-never-said")
        assert cells.nth(3).inner_text() == item.sample.output[0].content
        assert cells.nth(4).inner_text() == "contains: 0 ✗"
