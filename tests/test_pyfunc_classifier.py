"""The registered serving model: in-process through `mlflow.pyfunc`, and over HTTP through
`mlflow models serve` (slow: a server process that imports TensorFlow).

Real cells (one Parasitized, one Uninfected) come straight out of the dev zip in ../shared;
without it those checks skip and the synthetic-image variants still run.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import io
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.commands.test_predict import CLASSES, NAME, train_and_register
from tests.conftest import bomb_png, png_bytes, shared_file

CHAMPION = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return train_and_register(tmp_path_factory.mktemp("serving"))


@pytest.fixture(scope="module")
def pyfunc(reg):
    import mlflow

    mlflow.set_tracking_uri(reg.params.mlflow.tracking_uri)
    return mlflow.pyfunc.load_model(CHAMPION)


def real_cells() -> list[bytes]:
    """The first Parasitized and the first Uninfected PNG of the dev zip, as stored."""
    path = shared_file("malaria/cell_images_dev.zip")
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        picks = [next(n for n in names if f"/{cls}/" in n) for cls in ("Parasitized", "Uninfected")]
        return [zf.read(n) for n in picks]


def synthetic_cells() -> list[bytes]:
    return [png_bytes(60, seed=1), png_bytes(45, mode="RGBA", seed=2)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def check_rows(frame: pd.DataFrame, n: int) -> None:
    assert len(frame) == n
    assert set(frame["class"]) <= set(CLASSES)
    assert frame["probability"].between(0, 1).all() and frame["p_Parasitized"].between(0, 1).all()


# -------------------------------------------------------------------------------- in-process


def test_logged_model_has_no_input_schema_and_pinned_requirements(reg, pyfunc):
    import mlflow

    signature = pyfunc.metadata.signature
    assert signature.inputs is None and signature.outputs is None
    assert [p.name for p in signature.params.params] == ["threshold"]
    local = Path(mlflow.artifacts.download_artifacts(CHAMPION))
    assert list(local.rglob("*.keras"))
    requirements = (local / "requirements.txt").read_text()
    assert "keras==" in requirements and "pandas==" in requirements
    assert "pyarrow==" in requirements  # the request log's Parquet writer, where it is served
    assert list(local.rglob("reference.json"))  # the monitoring reference travels with it
    assert "dataframe_split" in (local / "serving_input_example.json").read_text()


@pytest.mark.parametrize("source", ["synthetic", "real"])
def test_pyfunc_takes_base64_frames_and_pixel_arrays(pyfunc, source):
    cells = synthetic_cells() if source == "synthetic" else real_cells()
    from_b64 = pyfunc.predict(pd.DataFrame({"image": [b64(c) for c in cells]}))
    check_rows(from_b64, 2)
    arrays = [pixels(c) for c in cells]
    from_list = pyfunc.predict(arrays)
    np.testing.assert_allclose(from_list["p_Parasitized"], from_b64["p_Parasitized"], rtol=1e-5)
    one = pyfunc.predict(arrays[0])
    np.testing.assert_allclose(one["p_Parasitized"], from_b64["p_Parasitized"][:1], rtol=1e-5)
    stacked = pyfunc.predict(np.stack([arrays[0], arrays[0]]))
    check_rows(stacked, 2)


def test_pyfunc_threshold_param_and_bad_input(pyfunc):
    from mlflow.exceptions import MlflowException

    frame = pd.DataFrame({"image": [b64(c) for c in synthetic_cells()]})
    assert set(pyfunc.predict(frame, params={"threshold": 0.0})["class"]) == {"Parasitized"}
    assert set(pyfunc.predict(frame, params={"threshold": 1.0})["class"]) == {"Uninfected"}
    with pytest.raises(MlflowException, match="image 1: not valid base64") as err:
        pyfunc.predict(pd.DataFrame({"image": [b64(synthetic_cells()[0]), "%%%"]}))
    assert err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"\(N, H, W, 3\)"):
        pyfunc.predict(np.zeros((2, 8, 8)))


def test_loading_warms_the_model_up_and_logs_nothing_by_default(pyfunc):
    served = pyfunc.unwrap_python_model()
    assert served.warmed_up is True  # one black image scored at load: no tracing on request 1
    assert served.request_log is None  # MEDIMG_REQUEST_LOG unset: logging off
    broken = copy.copy(served)
    broken.model = broken.scorer = None  # a warm-up that fails is skipped, not a failed load
    assert broken._warm_up() is False


def test_request_log_records_each_scored_image(reg, tmp_path, monkeypatch):
    import mlflow

    from medimg.data.properties import image_properties
    from medimg.monitoring.request_log import pixels_sha256

    folder = tmp_path / "requests"
    monkeypatch.setenv("MEDIMG_REQUEST_LOG", str(folder))
    monkeypatch.setenv("MEDIMG_MODEL_ALIAS", "champion")
    mlflow.set_tracking_uri(reg.params.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(CHAMPION)
    cells = synthetic_cells()
    answer = model.predict(pd.DataFrame({"image": [b64(c) for c in cells]}))
    log = model.unwrap_python_model().request_log
    assert log.flush()
    log.close()

    rows = pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("part-*.parquet"))])
    assert len(rows) == len(cells)  # one per image; the warm-up image is not logged
    assert list(rows["sha256"]) == [pixels_sha256(pixels(c)) for c in cells]
    assert list(rows["model_alias"]) == ["champion"] * 2
    assert list(rows["decision"]) == list(answer["class"])
    np.testing.assert_allclose(rows["p_Parasitized"], answer["p_Parasitized"])
    expected = image_properties(pixels(cells[1]))
    assert rows["width"].iloc[1] == expected["width"] == 45  # the original size, not the model's
    assert rows["sharpness"].iloc[1] == pytest.approx(expected["sharpness"])
    assert log.errors == 0 and log.dropped == 0


# ------------------------------------------------------------------ without medimg installed

WITHOUT_MEDIMG = """
import json, sys, importlib.util
sys.path.append(sys.argv[1])  # site-packages, its .pth files unread: no editable medimg path
assert importlib.util.find_spec("medimg") is None, "medimg is importable"
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[2])
model = mlflow.pyfunc.load_model(sys.argv[3])
rows = model.predict(pd.DataFrame({"image": json.loads(sys.stdin.read())}))
print(json.dumps({"rows": rows.to_dict("records"), "medimg": sys.modules["medimg"].__file__}))
"""


def predict_without_medimg(tracking_uri: str, model_uri: str, cells: list[bytes], cwd: Path):
    """Load `model_uri` and predict `cells` in a Python where medimg is not installed.

    `python -S` skips site-packages and its `.pth` files, the editable install's included;
    the script adds site-packages back as a plain path, so mlflow, keras and pandas import but
    `medimg` does not, as after `pip uninstall medimg`. What imports later comes from the
    model's own `code/` folder.
    """
    import json
    import sysconfig

    out = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            WITHOUT_MEDIMG,
            sysconfig.get_paths()["purelib"],
            tracking_uri,
            model_uri,
        ],
        input=json.dumps([b64(c) for c in cells]),
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ""},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return pd.DataFrame(result["rows"]), result["medimg"]


def test_registered_model_predicts_where_medimg_is_not_installed(reg, pyfunc, tmp_path):
    cells = cells_for_server()
    rows, medimg_file = predict_without_medimg(
        reg.params.mlflow.tracking_uri, CHAMPION, cells, tmp_path
    )
    assert "/code/medimg/" in medimg_file  # the copy logged with the model
    check_rows(rows, 2)
    here = pyfunc.predict(pd.DataFrame({"image": [b64(c) for c in cells]}))
    np.testing.assert_allclose(rows["p_Parasitized"], here["p_Parasitized"], rtol=1e-5)


# ------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    pytest.fail(f"server not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def mlflow_serve(model_uri: str, tracking_uri: str, server_log: Path, env: dict | None = None):
    """`mlflow models serve` of `model_uri` on a free 127.0.0.1 port, its output in
    `server_log`; yields (url, process) once /ping answers, and always stops it (`stop`)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    full_env = {
        **os.environ,
        # `mlflow models serve` execs uvicorn by name: the venv's, also outside `make`
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **(env or {}),
    }
    with server_log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, server_log)
        yield url, proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the CLI and the uvicorn it started), SIGKILL
    after 20 s; returns once the whole group is gone (uvicorn outlives the CLI briefly)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(reg, tmp_path_factory):
    """`mlflow models serve` of the champion on a free port; always stopped afterwards."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with mlflow_serve(CHAMPION, reg.params.mlflow.tracking_uri, log) as (url, _):
        yield url


def post(url: str, body: object | str):
    import requests

    data = body if isinstance(body, str) else None
    kwargs = {"data": data} if data is not None else {"json": body}
    return requests.post(
        f"{url}/invocations", headers={"Content-Type": "application/json"}, timeout=60, **kwargs
    )


def cells_for_server() -> list[bytes]:
    """Real cells when ../shared has them, else synthetic ones: the server starts only once."""
    try:
        return real_cells()
    except pytest.skip.Exception:  # one size: JSON `inputs` arrays must stack into one tensor
        return [png_bytes(60, seed=1), png_bytes(60, mode="RGBA", seed=2)]


@pytest.mark.slow
def test_server_answers_base64_and_arrays_and_survives_bad_requests(server):
    cells = cells_for_server()
    split = {"dataframe_split": {"columns": ["image"], "data": [[b64(c)] for c in cells]}}
    good = post(server, split)
    assert good.status_code == 200, good.text
    rows = pd.DataFrame(good.json()["predictions"])
    check_rows(rows, 2)

    arrays = post(server, {"inputs": [pixels(c).tolist() for c in cells]})
    assert arrays.status_code == 200, arrays.text
    np.testing.assert_allclose(
        pd.DataFrame(arrays.json()["predictions"])["p_Parasitized"],
        rows["p_Parasitized"],
        rtol=1e-5,
    )
    strings = post(server, {"inputs": [b64(c) for c in cells]})
    assert strings.status_code == 200, strings.text
    assert (
        post(server, {**split, "params": {"threshold": 0.0}}).json()["predictions"][0]["class"]
        == "Parasitized"
    )

    bad_b64 = post(server, {"dataframe_split": {"columns": ["image"], "data": [["@@@"]]}})
    assert bad_b64.status_code == 400 and "not valid base64" in bad_b64.json()["message"]
    not_json = post(server, '{"dataframe_split": [')
    assert 400 <= not_json.status_code < 500 and "JSON" in not_json.json()["message"]
    wrong_shape = post(server, {"inputs": [[[1, 2], [3, 4]]]})
    assert wrong_shape.status_code == 400 and "(N, H, W, 3)" in wrong_shape.json()["message"]
    wrong_key = post(server, {"images": []})
    assert 400 <= wrong_key.status_code < 500 and wrong_key.json()["message"]

    bomb = post(server, {"dataframe_split": {"columns": ["image"], "data": [[b64(bomb_png())]]}})
    assert bomb.status_code == 400 and "max_image_pixels" in bomb.json()["message"]

    again = post(server, split)  # the server keeps serving after every refusal
    assert again.status_code == 200 and again.json() == good.json()
