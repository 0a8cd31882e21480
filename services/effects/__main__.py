from services.effects import app
from services.servicekit import cli

cli.main(app)
