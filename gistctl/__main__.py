from gistctl.cli.main import app

app(prog_name="gistctl")
