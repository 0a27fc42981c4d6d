"""The query API and live stream of order history: a FastAPI app served by uvicorn (``ohs api``)."""
