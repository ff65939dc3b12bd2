"""Attention Branch Network training: CE(attention branch) + CE(perception branch).

The model is :class:`facetool.models.abn.ABN`. Both branches predict the same task (identities, one
attribute or all attributes; :mod:`facetool.tasks`) and both cross-entropies get weight 1, as in the
paper. Metrics: the perception branch's (``top1``/``attr_acc`` ... beside the majority baselines) and
the attention branch's with an ``att_`` prefix.
"""

from __future__ import annotations

from facetool.trainers.classify import ClassificationMethod


class ABNMethod(ClassificationMethod):
    name = "abn"

    def __init__(self, attention_weight: float = 1.0, task=None, majority=None, class_stats=None) -> None:
        super().__init__(task, majority, class_stats)
        self.attention_weight = float(attention_weight)

    def loss(self, model, batch, out, internals):
        terms = super().loss(model, batch, out, internals)
        att = super().loss(model, batch, internals["attention_logits"], internals)["ce"]
        terms["att_ce"] = self.attention_weight * att
        return terms

    def metrics(self, batch, out, internals):
        m = super().metrics(batch, out, internals)
        att = super().metrics(batch, internals["attention_logits"].detach(), internals)
        m.update({f"att_{k}": v for k, v in att.items() if not k.startswith("base_") and k != "attr_base"})
        return m

    def meta(self) -> dict:
        return {**super().meta(), "abn": {"attention_weight": self.attention_weight}}
