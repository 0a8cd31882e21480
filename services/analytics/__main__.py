from services.analytics import app
from services.servicekit import cli

cli.main(app)
