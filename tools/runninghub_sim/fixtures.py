"""The webapps (AI apps) the simulator knows, with the config `apiCallDemo` serves.

The ids are real public RunningHub webapp ids (listed in the reference); the
node lists are the simulator's own, shaped like RunningHub's: `fieldType` one of
STRING, LIST, IMAGE, AUDIO, VIDEO, INT, FLOAT, BOOLEAN, SWITCH; `fieldData` for a
LIST is a JSON string of ComfyUI's combo spec `[[options...], {"default": ...}]`;
one `nodeId` may carry several fields, and two nodes may share a `fieldName`.
The effects catalog points at these ids; `README.md` lists them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

REGIONS = ("cn", "global")

# Dev keys `make up` hands to effects when no real RunningHub key is set.
DEV_KEYS = {"cn": "sim-cn-dev-key-0000000000000000", "global": "sim-global-dev-key-00000000000000"}


def _node(
    node_id: str,
    node_name: str,
    field_name: str,
    field_type: str,
    value: str,
    description: str,
    description_en: str,
    options: list[str] | None = None,
) -> dict[str, Any]:
    field_data = ""
    if options is not None:
        field_data = json.dumps([options, {"default": value}])
    return {
        "nodeId": node_id,
        "nodeName": node_name,
        "fieldName": field_name,
        "fieldValue": value,
        "fieldData": field_data,
        "fieldType": field_type,
        "description": description,
        "descriptionEn": description_en,
    }


@dataclass(frozen=True)
class Webapp:
    webapp_id: str
    name: str
    regions: tuple[str, ...]
    nodes: tuple[dict[str, Any], ...]
    outputs: tuple[tuple[str, str], ...]  # (output nodeId, file extension)
    coins: int = 10  # per successful run
    tags: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def field(self, node_id: str, field_name: str) -> dict[str, Any] | None:
        for node in self.nodes:
            if node["nodeId"] == node_id and node["fieldName"] == field_name:
                return node
        return None

    def config(self, base_url: str) -> dict[str, Any]:
        """`data` of `GET /api/webapp/apiCallDemo` for this app."""
        demo = {
            "webappId": self.webapp_id,
            "apiKey": "{{apiKey}}",
            "nodeInfoList": [
                {k: n[k] for k in ("nodeId", "fieldName", "fieldValue", "description")} for n in self.nodes
            ],
        }
        curl = (
            f"curl --location --request POST '{base_url}/task/openapi/ai-app/run' \\\n"
            "--header 'Content-Type: application/json' \\\n"
            f"--data-raw '{json.dumps(demo, ensure_ascii=False, indent=4)}'"
        )
        return {
            "curl": curl,
            "accessEncrypted": False,
            "webappName": self.name,
            "statisticsInfo": {"likeCount": "0", "downloadCount": "0", "useCount": "0", "pv": "0"},
            "nodeInfoList": [dict(n) for n in self.nodes],
            "covers": [
                {
                    "id": f"{self.webapp_id[:10]}{i}",
                    "objName": f"cover/{self.webapp_id}-{i}.png",
                    "url": f"{base_url}/__sim/files/cover/{self.webapp_id}-{i}.png",
                    "thumbnailUri": f"{base_url}/__sim/files/cover/{self.webapp_id}-{i}.png",
                    "imageWidth": "768",
                    "imageHeight": "1024",
                }
                for i in range(1, 2)
            ],
            "tags": [
                {"id": str(1000 + i), "name": t, "nameEn": t, "labels": None} for i, t in enumerate(self.tags)
            ],
        }


WEBAPPS: dict[str, Webapp] = {
    w.webapp_id: w
    for w in (
        Webapp(
            "1947926545896734722",
            "人像高清放大 Portrait upscale",
            REGIONS,
            (
                _node("15", "LoadImage", "image", "IMAGE", "example.png", "上传人像", "Portrait photo"),
                _node(
                    "42",
                    "UpscaleModelLoader",
                    "scale_by",
                    "LIST",
                    "2",
                    "放大倍数",
                    "Scale factor",
                    ["2", "4"],
                ),
            ),
            (("9", "png"),),
            coins=12,
            tags=("upscale", "portrait"),
        ),
        Webapp(
            "1903718280794906626",
            "一键换背景 Background change",
            REGIONS,
            (
                _node("12", "LoadImage", "image", "IMAGE", "subject.png", "主体图片", "Subject"),
                _node("27", "LoadImage", "image", "IMAGE", "background.png", "背景图片", "Background"),
                _node(
                    "31",
                    "CLIPTextEncode",
                    "text",
                    "STRING",
                    "soft studio light",
                    "补充描述",
                    "Extra prompt",
                ),
            ),
            (("9", "png"),),
            coins=18,
            tags=("background",),
        ),
        Webapp(
            "1937084629516193794",
            "Flux Kontext 单图编辑 Flux Kontext single picture",
            REGIONS,
            (
                _node("190", "LoadImage", "image", "IMAGE", "input.png", "输入图片", "Input image"),
                _node(
                    "191",
                    "RH_Translator",
                    "prompt",
                    "STRING",
                    "turn it into a watercolor",
                    "编辑指令",
                    "Instruction",
                ),
                _node(
                    "193",
                    "FluxKontextImageScale",
                    "aspect_ratio",
                    "LIST",
                    "original",
                    "画面比例",
                    "Aspect ratio",
                    ["original", "1:1", "3:4", "4:3", "9:16", "16:9"],
                ),
                _node("194", "KSampler", "seed", "INT", "42", "随机种子", "Seed"),
                _node("194", "KSampler", "guidance", "FLOAT", "2.5", "引导强度", "Guidance"),
                _node("196", "ImageSharpen", "enabled", "BOOLEAN", "true", "锐化", "Sharpen"),
            ),
            (("136", "png"), ("137", "png")),
            coins=25,
            tags=("edit", "flux"),
        ),
        Webapp(
            "1907365560131153921",
            "换脸 Face swap",
            REGIONS,
            (
                _node("3", "LoadImage", "image", "IMAGE", "face.png", "人脸图片", "Face"),
                _node("4", "LoadImage", "image", "IMAGE", "target.png", "目标图片", "Target"),
                _node("11", "ImpactSwitch", "select", "SWITCH", "1", "模式选择", "Mode"),
            ),
            (("9", "jpg"),),
            coins=15,
            tags=("face",),
        ),
        Webapp(
            "1907581130097192962",
            "终极放大 Ultimate upscale",
            ("cn",),
            (
                _node("10", "LoadImage", "image", "IMAGE", "low.png", "待放大图片", "Image"),
                _node("8", "UltimateSDUpscale", "steps", "INT", "20", "步数", "Steps"),
                _node("8", "UltimateSDUpscale", "denoise", "FLOAT", "0.3", "重绘幅度", "Denoise"),
                _node("8", "UltimateSDUpscale", "seed", "INT", "1", "随机种子", "Seed"),
            ),
            (("9", "png"),),
            coins=30,
            tags=("upscale",),
        ),
        # Published but never run on the website: its config lists no nodes.
        Webapp("1990000000000000001", "未运行的应用 Never run", REGIONS, (), (("9", "png"),), coins=5),
        # Only on the international site.
        Webapp(
            "1990000000000000002",
            "Anime style (global only)",
            ("global",),
            (
                _node("5", "LoadImage", "image", "IMAGE", "photo.png", "Photo", "Photo"),
                _node("6", "CLIPTextEncode", "text", "STRING", "anime style", "Style", "Style"),
            ),
            (("9", "webp"),),
            coins=8,
            tags=("anime",),
        ),
    )
}


def webapps_for(region: str) -> dict[str, Webapp]:
    return {k: w for k, w in WEBAPPS.items() if region in w.regions}
