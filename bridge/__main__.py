from bridge.cli import bridge

bridge()
