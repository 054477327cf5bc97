"""koubou: hand LLM work from a coding assistant to local models through Celery.

`celery -A koubou worker` finds the Celery app in `koubou.celery`; importing this
package has no side effects.
"""

__version__ = "0.1.0"
