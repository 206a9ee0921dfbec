import httpx
from fastapi import FastAPI

from tests.servers import serve


def test_serve_runs_a_real_server_on_loopback():
    app = FastAPI()

    @app.get("/ping")
    def ping() -> dict:
        return {"pong": True}

    with serve(app) as base:
        assert base.startswith("http://127.0.0.1:")
        assert httpx.get(f"{base}/ping").json() == {"pong": True}
