"""The wbc-trust web app: ``streamlit run app_streamlit.py`` (the page itself lives in ``wbc_trust.app``)."""

from wbc_trust.app import main

main()
