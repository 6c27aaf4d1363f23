"""Arithmetic answers checked by their syntax tree, never by running them: the Countdown answer
and the `python_expr` code answer are expressions over the row's own numbers.

`integer_expression` accepts only integer literals written as plain decimals, each of the
row's numbers exactly once, and the operations the row allows; `value` computes one exactly.
Anything else (a name, a call, a string, a boolean, a float, `0x10`, `1_0`, `**`, a
comparison, a conditional) is not such an expression.
"""
from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction

OPERATORS = {"+": (ast.Add, ast.UAdd), "-": (ast.Sub, ast.USub), "*": (ast.Mult,), "/": (ast.Div,)}
MAX_EXPRESSION_CHARS = 256


def integer_expression(expression: str, numbers: list, operations: set[str]) -> ast.Expression | None:
    """The syntax tree of `expression` if it uses each of `numbers` exactly once as a plain
    decimal integer literal and no operation outside `operations`; else None."""
    source = expression.strip()
    if len(source) > MAX_EXPRESSION_CHARS:
        return None
    try:
        tree = ast.parse(source, mode="eval")
        wanted = Counter(int(x) for x in numbers)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None
    allowed = tuple(node for op in operations for node in OPERATORS.get(op, ()))
    literals = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant):
            if type(node.value) is not int or ast.get_source_segment(source, node) != str(node.value):
                return None
            literals.append(node.value)
        elif isinstance(node, (ast.BinOp, ast.UnaryOp)):
            if not isinstance(node.op, allowed):
                return None
        elif not isinstance(node, (ast.Expression, *allowed)):
            return None
    return tree if Counter(literals) == wanted else None


def value(tree: ast.Expression) -> Fraction | None:
    """The exact value of a tree from `integer_expression`; None on a division by zero."""

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        a, b = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b

    try:
        return ev(tree)
    except (ZeroDivisionError, RecursionError):
        return None
