"""ft.report.html: the self-contained HTML report.

Pure-Python checks (structure, escaping, data kinds, errors) and a check in a real headless
Chromium driven by Selenium: no console errors, every target present, every image decoded,
text items shown, a screenshot written (to $FASTTRAK_SCREENSHOT_DIR, else tmp_path).
The browser test needs Debian's chromium and chromium-driver and `pip install selenium`:
scripts/install_chromium.sh installs all three; it is skipped, saying so, without them.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import fasttrak as ft
from fasttrak import report
from fasttrak.report import page

INSTALL = (
    "scripts/install_chromium.sh (apt-get install chromium chromium-driver; pip install selenium)"
)
VOID = {"meta", "link", "img", "input", "br", "hr", "source", "wbr", "col", "area", "base"}


# ---------------------------------------------------------------------- a tiny digits run


class DigitsRun:
    """TRAK on 150 sklearn digits (5 labels flipped) with 2 small MLPs; 6 targets."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(x))
        pixels = torch.tensor(x[order] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
        labels = torch.tensor(y[order], dtype=torch.int64)
        self.x_train, self.y_train = pixels[:150], labels[:150].clone()
        self.flipped = [3, 17, 42, 80, 121]
        self.y_train[self.flipped] = (self.y_train[self.flipped] + 1) % 10
        self.x_target, self.y_target = pixels[150:156], labels[150:156]
        states = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest on shared cores
        try:
            for seed in range(2):
                torch.manual_seed(seed)
                model = self.make_model()
                for _ in range(100):  # full-batch gradient descent (no optimizer to import)
                    model.zero_grad()
                    nn.functional.cross_entropy(model(self.x_train), self.y_train).backward()
                    with torch.no_grad():
                        for param in model.parameters():
                            param -= 0.5 * param.grad
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            self.attribute(states)
        finally:
            torch.set_num_threads(threads)

    def attribute(self, states: list[dict[str, torch.Tensor]]) -> None:
        self.trak = ft.TRAK(
            self.make_model(),
            task=ft.tasks.ImageClassification(),
            proj_dim=64,
            store=None,
            batch_size=150,
            progress=False,
        )
        self.trak.featurize((self.x_train, self.y_train), checkpoints=states)
        self.scores = self.trak.score((self.x_target, self.y_target))
        self.self_influence = self.trak.self_influence()

    @staticmethod
    def make_model() -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def report(self, path: Path, **kwargs: Any) -> Path:
        options: dict[str, Any] = {
            "self_influence": self.self_influence,
            "class_names": [f"digit {d}" for d in range(10)],
            "lds": ft.evaluate.LDSResult(0.512, 0.01, np.linspace(0.2, 0.8, 6), 6),
            "settings": {**self.trak.options, "flipped labels": self.flipped},
            "title": "fasttrak report: digits",
        }
        options.update(kwargs)
        return report.html(
            path,
            self.scores,
            (self.x_train, self.y_train),
            (self.x_target, self.y_target),
            **options,
        )


@pytest.fixture(scope="module")
def digits() -> DigitsRun:
    start = time.perf_counter()
    run = DigitsRun()
    print(f"digits run: {time.perf_counter() - start:.1f} s")
    return run


TEXTS = [
    ("a great film, I loved it", 1),
    ("terrible acting <script>window.__pwned = 1</script>", 0),
    ('the plot & the score were "fine"', 1),
    ("boring </div></section> and long", 0),
    ("an instant classic", 1),
    ("I want my two hours back", 0),
]


def text_report(path: Path, **kwargs: Any) -> Path:
    scores = np.random.default_rng(0).normal(size=(3, len(TEXTS)))
    targets = [("what a film", 1), ("dull", 0), ("<b>bold</b> claim", 1)]
    return report.html(path, scores, TEXTS, targets, top=2, class_names=["neg", "pos"], **kwargs)


# ---------------------------------------------------------------------- HTML structure


class Structure(HTMLParser):
    """Tags, ids and text of a page, checking that non-void elements are balanced."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.ids: list[str] = []
        self.starts: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))
        ids = [v for k, v in attrs if k == "id" and v is not None]
        self.ids.extend(ids)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def tags(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.starts if tag == name]


def parse(path: Path) -> Structure:
    parser = Structure()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert not parser.errors, parser.errors[:5]
    assert not parser.stack, f"unclosed: {parser.stack}"
    assert len(parser.ids) == len(set(parser.ids)), "ids must be unique"
    return parser


def test_digits_page_structure(digits: DigitsRun, tmp_path: Path) -> None:
    start = time.perf_counter()
    index = digits.report(tmp_path / "rep")
    seconds = time.perf_counter() - start
    assert index == tmp_path / "rep" / "index.html" and index.is_file()
    assert list((tmp_path / "rep").iterdir()) == [index], "one self-contained file"
    doc = parse(index)
    articles = [a["id"] for a in doc.tags("article")]
    assert articles == [f"target-{t}" for t in range(6)]
    for anchor in ("overview", "suspects", "settings", "targets"):
        assert anchor in doc.ids
    images = doc.tags("img")
    # per target: itself, 5 proponents, 5 opponents; suspects: 10 + 10
    assert len(images) == 6 * 11 + 20
    assert all(str(img["src"]).startswith("data:image/png;base64,") for img in images)
    text = index.read_text()
    assert "http://" not in text and "https://" not in text, "no network"
    assert "0.512 ± 0.010" in text and "digit 8 (8)" in text and "flipped labels" in text
    assert len(doc.tags("svg")) >= 6 + 4  # per target, overall, LDS, total, self-influence
    assert index.stat().st_size < 300_000
    print(f"report written in {seconds:.2f} s, {index.stat().st_size} bytes")


def test_streamed_scores_give_the_dense_page(digits: DigitsRun, tmp_path: Path) -> None:
    # a fresh Scores (nothing cached) is streamed chunk by chunk; the array path is dense
    fresh = digits.trak.score((digits.x_target, digits.y_target))
    a = report.html(
        tmp_path / "a", fresh, (digits.x_train, digits.y_train), (digits.x_target, digits.y_target)
    )
    assert fresh._dense is None
    b = report.html(
        tmp_path / "b",
        np.asarray(fresh),
        (digits.x_train, digits.y_train),
        (digits.x_target, digits.y_target),
    )
    assert a.read_text() == b.read_text()


def test_suspects_rank_total_and_self_influence(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.1, 1.0, (4, 20))
    scores[:, 7] = -1.0  # most negative total influence
    scores[:, 2] = -0.5
    self_inf = rng.uniform(0.0, 0.1, 20)
    self_inf[7], self_inf[11] = 5.0, 9.0
    images = np.random.default_rng(0).random((20, 8, 8))
    index = report.html(tmp_path, scores, images, images[:4], self_influence=self_inf)
    text = index.read_text()
    total = text.split('class="items total"')[1]
    assert total.index("train #7<") < total.index("train #2<")
    highest = text.split('class="items self"')[1]
    assert highest.index("train #11<") < highest.index("train #7<")
    card_7 = total[total.index("train #7<") :].split("</figure>")[0]
    assert 'class="badge">both' in card_7 and "example(s) are in both lists" in text


def test_max_targets_bounds_the_page(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).normal(size=(100, 30))
    images = np.random.default_rng(1).random((30, 16, 16, 3))
    index = report.html(tmp_path, scores, images, np.zeros((100, 16, 16)), max_targets=3, top=2)
    doc = parse(index)
    assert [a["id"] for a in doc.tags("article")] == ["target-0", "target-1", "target-2"]
    assert "the first 3 of 100 are shown" in index.read_text()


# ---------------------------------------------------------------------- text data


def test_text_is_escaped(tmp_path: Path) -> None:
    index = text_report(tmp_path)
    doc = parse(index)
    assert len(doc.tags("script")) == 1, "only the page's own script"
    assert len(doc.tags("b")) == 0 or all(a == {} for a in doc.tags("b"))
    raw = index.read_text()
    assert "<script>window.__pwned" not in raw and "&lt;script&gt;window.__pwned" in raw
    assert "&lt;b&gt;bold&lt;/b&gt; claim" in raw
    assert "the plot &amp; the score were &quot;fine&quot;" in raw
    body = "".join(doc.text)
    assert "terrible acting <script>window.__pwned = 1</script>" in body  # shown as text
    assert len(doc.tags("img")) == 0
    assert sum("text" in str(a.get("class")) for a in doc.tags("div")) >= 3 * 5


def test_text_kinds(tmp_path: Path) -> None:
    scores = np.random.default_rng(0).normal(size=(2, 4))
    texts = ["alpha", "beta", "gamma", "delta"]
    for name, train in {
        "strings": texts,
        "columns": (texts, [0, 1, 0, 1]),
        "dicts": [{"text": t, "label": i % 2} for i, t in enumerate(texts)],
        "dict of columns": {"sentence": texts, "label": torch.tensor([0, 1, 0, 1])},
    }.items():
        index = report.html(tmp_path / name.replace(" ", "_"), scores, train, ["x", "y"], top=1)
        doc = parse(index)
        body = "".join(doc.text)
        assert "alpha" in body or "beta" in body or "gamma" in body, name
        assert len(doc.tags("article")) == 2
    labelled = (tmp_path / "dicts" / "index.html").read_text()
    assert 'title="label">1</span>' in labelled


def test_datasets_loaders_and_pil_images(tmp_path: Path) -> None:
    from PIL import Image
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.rand(5, 3, 8, 8), torch.arange(5)
    scores = np.random.default_rng(0).normal(size=(2, 5))
    pil = [(Image.fromarray(np.full((6, 6, 3), 40 * i, np.uint8)), i) for i in range(2)]
    for name, train, targets in [
        ("dataset", TensorDataset(x, y), pil),
        ("loader", DataLoader(TensorDataset(x, y), batch_size=2), x[:2]),
    ]:
        index = report.html(tmp_path / name, scores, train, targets, top=2)
        doc = parse(index)
        assert len(doc.tags("img")) == 2 * 5 + 5, name


def test_store_info_as_settings(tmp_path: Path) -> None:
    trak = ft.TRAK(
        nn.Linear(4, 3),
        task=ft.tasks.ImageClassification(),
        proj_dim=8,
        store=tmp_path / "store",
        progress=False,
    )
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    trak.featurize((x, y), checkpoints=[None])
    scores = trak.score((x[:2], y[:2]))
    index = report.html(
        tmp_path / "rep", scores, (x, y), (x[:2], y[:2]), settings=ft.store_info(tmp_path / "store")
    )
    text = index.read_text()
    assert "<th>projector</th>" in text and "<th>progress</th>" in text and "complete" in text


def test_token_ids_and_vectors_are_text(tmp_path: Path) -> None:
    scores = np.ones((1, 3))
    train = [
        {"input_ids": torch.tensor([101, 2023, 102]), "labels": 1},
        (torch.tensor([0.5, 1.5, 2.5]), 0),
        None,
    ]
    text = report.html(tmp_path, scores, train, None, top=1).read_text()
    assert "token ids (3): 101 2023 102" in text
    assert "array (3,): [0.5, 1.5, 2.5]" in text


# ---------------------------------------------------------------------- images


def decode(uri: str) -> np.ndarray:
    from PIL import Image

    data = base64.b64decode(uri.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize(
    ("item", "shape"),
    [
        (torch.rand(3, 10, 12), (10, 12, 3)),  # CHW tensor
        (np.random.rand(10, 12, 3) * 1000 - 500, (10, 12, 3)),  # HWC, any range
        (np.random.rand(1, 10, 12), (10, 12)),  # 1HW
        (np.random.rand(10, 12, 1), (10, 12)),  # HW1
        (torch.rand(10, 12, dtype=torch.bfloat16), (10, 12)),  # HW, bfloat16
        (torch.rand(64), (8, 8)),  # flat square
        (np.full((5, 5), 3.0), (5, 5)),  # constant
        (np.random.rand(1000, 800), (96, 77)),  # huge: downscaled
        ((np.random.rand(6, 6) * 255).astype(np.uint8), (6, 6)),
    ],
)
def test_images_are_detected_and_normalised(item: Any, shape: tuple[int, ...]) -> None:
    renderer = page._Renderer(None, None)
    items = page._Items("train", [(item, 3)], 1, "columns")
    shown = renderer(items, 0)
    assert shown.image is not None and shown.label == "3"
    pixels = decode(shown.image)
    assert pixels.shape == shape and pixels.dtype == np.uint8
    assert max(shown.size) == page.DISPLAY_SIDE


def test_png_without_pillow_decodes() -> None:
    rng = np.random.default_rng(0)
    for pixels in (
        rng.integers(0, 256, (7, 9), np.uint8),
        rng.integers(0, 256, (5, 4, 3), np.uint8),
    ):
        uri = "data:image/png;base64," + base64.b64encode(page._png_zlib(pixels)).decode()
        assert np.array_equal(decode(uri), pixels)


def test_images_without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)  # `from PIL import Image` fails
    renderer = page._Renderer(None, None)
    items = page._Items("train", [np.random.rand(300, 200, 3)], 1, "columns")
    shown = renderer(items, 0)
    monkeypatch.undo()
    assert shown.image is not None
    assert decode(shown.image).shape == (75, 50, 3)  # every 4th pixel


def test_custom_render(tmp_path: Path) -> None:
    scores = np.ones((1, 2))
    index = report.html(
        tmp_path,
        scores,
        ["a", "b"],
        ["t"],
        top=1,
        render=lambda s: {"image": np.eye(4) if s == "a" else np.zeros((4, 4)), "label": s.upper()},
    )
    doc = parse(index)
    assert len(doc.tags("img")) >= 2 and 'title="label">A</span>' in index.read_text()


def test_html_file_path_and_existing_folder(tmp_path: Path) -> None:
    scores = np.ones((1, 2))
    assert report.html(tmp_path / "r.html", scores, ["a", "b"], ["t"]) == tmp_path / "r.html"
    (tmp_path / "f").mkdir()
    assert report.html(tmp_path / "f", scores, ["a", "b"], ["t"]).name == "index.html"


def test_plot_top_attributions_still_importable() -> None:
    from fasttrak.report import plot_top_attributions

    assert callable(plot_top_attributions) and callable(report.html)


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        ({"scores": np.ones(4)}, ft.DataError, "scores[None, :]"),
        ({"scores": np.ones((2, 5))}, ft.DataError, "train has 4 examples but scores have 5"),
        ({"scores": np.ones((3, 4))}, ft.DataError, "targets has 2 examples but scores have 3"),
        ({"scores": np.full((2, 4), np.nan)}, ft.DataError, "NaN"),
        ({"scores": "x"}, ft.DataTypeError, "ft.Scores"),
        ({"top": 0}, ft.ConfigError, "top must be a positive integer"),
        ({"top": 1.5}, ft.ConfigTypeError, "top must be a positive integer"),
        ({"max_targets": 0}, ft.ConfigError, "max_targets"),
        ({"self_influence": np.ones(3)}, ft.DataError, "trak.self_influence()"),
        ({"lds": "0.5"}, ft.ConfigTypeError, "ft.evaluate.lds"),
        ({"settings": [1]}, ft.ConfigTypeError, "ft.store_info"),
        ({"class_names": "ab"}, ft.ConfigTypeError, "list of strings"),
        ({"render": 3}, ft.ConfigTypeError, "render must be a function"),
        ({"render": lambda item: item}, ft.DataError, "render must return a dict"),
        ({"render": lambda item: {"image": np.ones(5)}}, ft.DataError, "HxW"),
        ({"train": iter([1, 2, 3, 4])}, ft.DataTypeError, "list(dataset)"),
        ({"train": "abcd"}, ft.DataTypeError, "list of strings"),
        ({"train": (np.ones(4), np.ones(3))}, ft.DataError, "same length"),
        ({"train": {"text": ["a"] * 4, "label": 3}}, ft.DataTypeError, "columns"),
    ],
)
def test_bad_inputs_name_the_fix(
    tmp_path: Path, change: dict[str, Any], error: type[Exception], words: str
) -> None:
    kwargs: dict[str, Any] = {
        "scores": np.ones((2, 4)),
        "train": ["a", "b", "c", "d"],
        "targets": ["x", "y"],
    }
    kwargs.update(change)
    with pytest.raises(error, match=None) as caught:
        report.html(tmp_path, **kwargs)
    assert words in str(caught.value)


def test_path_that_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "report"
    file.write_text("")
    with pytest.raises(ft.ConfigError, match="is a file"):
        report.html(file, np.ones((1, 1)), ["a"], ["b"])


# ---------------------------------------------------------------------- in Chromium


def _browser_paths() -> tuple[str, str]:
    """Chromium and chromedriver: $FASTTRAK_CHROMIUM / $FASTTRAK_CHROMEDRIVER, else Debian's
    (`chromium` on PATH, /usr/bin/chromedriver); skips, naming the install, without them."""
    pytest.importorskip("selenium", reason=f"selenium is not installed; install: {INSTALL}")
    binary = os.environ.get("FASTTRAK_CHROMIUM") or shutil.which("chromium")
    binary = binary or shutil.which("chromium-browser")
    driver = os.environ.get("FASTTRAK_CHROMEDRIVER") or "/usr/bin/chromedriver"
    if not os.path.exists(driver):
        driver = shutil.which("chromedriver") or driver
    if binary is None or not os.path.exists(binary):
        pytest.skip(f"chromium is not installed ({binary or 'not on PATH'}); install: {INSTALL}")
    if not os.path.exists(driver):
        pytest.skip(f"chromedriver is not installed ({driver}); install: {INSTALL}")
    return binary, driver


@pytest.fixture(scope="module")
def browser() -> Any:
    binary, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver: Selenium Manager is never asked to download one
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FASTTRAK_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser: Any, index: Path) -> list[dict[str, Any]]:
    """Load ``index`` and return the browser's SEVERE log entries."""
    browser.get(index.resolve().as_uri())
    browser.execute_script("return document.readyState")
    return [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]


def full_screenshot(browser: Any, path: Path, max_height: int = 4000) -> Path:
    height = int(browser.execute_script("return document.documentElement.scrollHeight"))
    browser.set_window_size(1280, min(height, max_height))
    browser.save_screenshot(str(path))
    browser.set_window_size(1280, 900)
    print(f"screenshot: {path}")
    return path


def test_chromium_digits_report(browser: Any, digits: DigitsRun, tmp_path: Path) -> None:
    index = digits.report(tmp_path / "digits")
    assert open_page(browser, index) == []
    ids = browser.execute_script(
        "return Array.from(document.querySelectorAll('article.target')).map(a => a.id)"
    )
    assert ids == [f"target-{t}" for t in range(6)]
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.width])"
    )
    assert len(images) == 6 * 11 + 20
    assert all(done and natural > 0 and width > 0 for done, natural, width in images), images
    # the filter works: targets labelled "digit 8"
    eights = int((digits.y_target == 8).sum())
    shown = browser.execute_script(
        "const f = document.getElementById('filter'); f.value = 'digit 8';"
        "f.dispatchEvent(new Event('input'));"
        "return document.querySelectorAll('article.target:not(.hidden)').length"
    )
    assert shown == eights > 0
    browser.execute_script(
        "const f = document.getElementById('filter'); f.value = '';"
        "f.dispatchEvent(new Event('input'));"
    )
    shot = full_screenshot(browser, screenshot_dir(tmp_path) / "report_digits.png")
    assert shot.stat().st_size > 10_000
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []


def test_chromium_text_report(browser: Any, tmp_path: Path) -> None:
    index = text_report(tmp_path / "text")
    assert open_page(browser, index) == []
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    texts = browser.execute_script(
        "return Array.from(document.querySelectorAll('.item .text')).map(t => t.innerText)"
    )
    assert len(texts) == 3 * (1 + 2 + 2) + len(TEXTS) and all(t.strip() for t in texts)
    assert any("<script>window.__pwned = 1</script>" in t for t in texts)
    visible = browser.execute_script(
        "return Array.from(document.querySelectorAll('article.target'))"
        ".every(a => a.getBoundingClientRect().height > 0)"
    )
    assert visible
    full_screenshot(browser, screenshot_dir(tmp_path) / "report_text.png")
