"""The settings of `internvl-mpo serve`: its flags, which every part of the server reads."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """The flags of `internvl-mpo serve` (see `runner.serve` for their meaning)."""

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_len: int = 4096
    device: str | None = None
    dtype: str | None = None
    compile: bool = False
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False
    allow_local_images: bool = False
    max_request_bytes: int = 32 * 2**20
    max_images: int = 8
    max_tiles: int = 24
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    image_timeout: float = 10.0
    max_prompt_tokens: int | None = None
    max_tokens: int = 2048
    max_n: int = 4
    max_concurrent_requests: int = 64
    request_read_timeout: float = 300.0
    send_timeout: float = 60.0
    header_timeout: float = 60.0
    max_connections: int = 256
