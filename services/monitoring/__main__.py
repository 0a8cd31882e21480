from services.monitoring import app
from services.servicekit import cli

cli.main(app)
