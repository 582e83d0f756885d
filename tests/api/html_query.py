"""A small HTML tree for the dashboard's tests, on the standard library's parser: find
elements by a CSS selector's simple subset (tag, #id, .class, [attr], [attr="value"], joined
by the descendant combinator) and read their attributes and text."""

from __future__ import annotations

import re
from html.parser import HTMLParser

VOID = {
    "area",
    "base",
    "br",
    "col",
    "embed",
    "hr",
    "img",
    "input",
    "link",
    "meta",
    "source",
    "track",
    "wbr",
}
_COMPOUND = re.compile(r'([a-z0-9]+)|#([\w-]+)|\.([\w-]+)|\[([\w-]+)(?:="([^"]*)")?\]')


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    def __getitem__(self, name: str) -> str:
        return self.attrs[name]

    def has_attr(self, name: str) -> bool:
        return name in self.attrs

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def descendants(self):
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.descendants()

    def select(self, selector: str) -> list[Element]:
        found = [self]
        for part in selector.split():
            test = _compound(part)
            seen: dict[int, Element] = {}
            for scope in found:
                for el in scope.descendants():
                    if test(el):
                        seen.setdefault(id(el), el)
            found = list(seen.values())
        return found

    def select_one(self, selector: str) -> Element | None:
        found = self.select(selector)
        return found[0] if found else None


def _compound(part: str):
    checks = []
    for tag, el_id, cls, attr, value in _COMPOUND.findall(part):
        if tag:
            checks.append(lambda el, t=tag: el.tag == t)
        elif el_id:
            checks.append(lambda el, i=el_id: el.attrs.get("id") == i)
        elif cls:
            checks.append(lambda el, c=cls: c in el.classes)
        elif value:
            checks.append(lambda el, a=attr, v=value: el.attrs.get(a) == v)
        else:
            checks.append(lambda el, a=attr: a in el.attrs)
    return lambda el: all(check(el) for check in checks)


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.current = Element("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        el = Element(tag, {k: v if v is not None else "" for k, v in attrs}, self.current)
        self.current.children.append(el)
        if tag not in VOID:
            self.current = el

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(
            Element(tag, {k: v if v is not None else "" for k, v in attrs}, self.current)
        )

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html: str) -> Element:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    return builder.root
