"""LeRobotDataset v3 interchange: `fleetloop export --format lerobot` (export.py) and
`fleetloop import --format lerobot` (importer.py). The layout is in format.py, video I/O in
video.py, the column mapping in docs/lerobot.md."""
