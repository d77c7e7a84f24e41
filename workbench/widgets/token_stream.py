"""A token text that grows by appending: each update sends only the new spans to the browser.

An ipywidgets HTML widget sends its whole value on every change, so a long run would resend the text each
update. This anywidget keeps the text in Python and sends custom messages instead: `append` adds spans to
the open `.wb-text` box, `reset` replaces everything (the final text, or a browser view that asks for the
whole text when it is first drawn or redrawn). The JavaScript is the string below: it ships with the
package and loads nothing from elsewhere.
"""

from __future__ import annotations

from typing import Any

import anywidget

from workbench.views.tokens import CSS

ESM = """
export default {
  render({ model, el }) {
    const root = document.createElement("div");
    el.appendChild(root);
    const onMessage = (msg) => {
      if (msg.type === "reset") {
        root.innerHTML = msg.html;
      } else if (msg.type === "append") {
        const boxes = root.querySelectorAll(".wb-text");
        const box = boxes.length ? boxes[boxes.length - 1] : root;
        const follow = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
        box.insertAdjacentHTML("beforeend", msg.html);
        if (follow) box.scrollTop = box.scrollHeight;
      }
    };
    model.on("msg:custom", onMessage);
    model.send({ type: "want" });
    return () => model.off("msg:custom", onMessage);
  },
};
"""


class TokenStream(anywidget.AnyWidget):
    """HTML that only grows while a run goes (`append`), replaced once at the end (`reset`)."""

    _esm = ESM
    _css = CSS

    def __init__(self, html: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self._head, self._parts = html, []
        self.appends = 0  # append messages sent
        self.sent_chars = 0  # HTML characters sent (appends and resets)
        self.resend_chars = 0  # what an HTML widget would have sent: the whole text at every update
        self.on_msg(self._on_message)

    @property
    def html(self) -> str:
        """The whole text as the browser shows it."""
        return self._head + "".join(self._parts)

    def append(self, html: str) -> None:
        if html:
            self._parts.append(html)
            self.appends += 1
            self.sent_chars += len(html)
            self.resend_chars += sum(map(len, self._parts)) + len(self._head)
            self.send({"type": "append", "html": html})

    def reset(self, html: str) -> None:
        self._head, self._parts = html, []
        self.sent_chars += len(html)
        self.resend_chars += len(html)
        self.send({"type": "reset", "html": html})

    def _on_message(self, widget: Any, content: dict, buffers: Any) -> None:
        if content.get("type") == "want":
            self.send({"type": "reset", "html": self.html})
