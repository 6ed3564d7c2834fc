import pytest
import torch

from lib.model import TwoTowerConfig, TwoTowerModel

CARDS = (("make_code", 5), ("body_type_code", 4), ("geo_cell", 7))
# Bag-of-tokens features: (name, codes incl. the 0 pad, slots per listing).
TOKENS = (("amenities", 6, 3), ("words", 4, 2))


def make_config(**overrides) -> TwoTowerConfig:
    base = dict(
        num_users=20,
        num_listings=30,
        cardinalities=CARDS,
        num_dense=2,
        dim=8,
        id_dim=8,
        feature_dim=4,
        hidden=16,
        id_dropout=0.0,
    )
    return TwoTowerConfig(**{**base, **overrides})


def make_batch(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "user_idx": torch.randint(0, 20, (n,), generator=gen),
        "listing_idx": torch.randint(0, 30, (n,), generator=gen),
        "codes": torch.stack([torch.randint(0, c, (n,), generator=gen) for _, c in CARDS], 1),
        "dense": torch.randn(n, 2, generator=gen),
        "weight": torch.rand(n, generator=gen) * 3,
        "log_q": -torch.rand(n, generator=gen) * 4,
    }


def test_config_round_trips_and_is_hashable():
    config = make_config(cardinalities=dict(CARDS), dense_names=("a", "b"))
    assert config.cardinalities == CARDS
    assert config.code_names == ("make_code", "body_type_code", "geo_cell")
    again = TwoTowerConfig.from_dict(config.to_dict())
    assert again == config
    assert hash(again) == hash(config)
    assert config.to_dict()["cardinalities"] == {"make_code": 5, "body_type_code": 4, "geo_cell": 7}
    tokens = make_config(token_fields=[list(t) for t in TOKENS])
    assert tokens.token_fields == TOKENS
    assert TwoTowerConfig.from_dict(tokens.to_dict()) == tokens


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_users": 0},
        {"cardinalities": (("make_code", 0),)},
        {"id_dropout": 1.0},
        {"temperature": 0.0},
        {"dense_names": ("only_one",)},
        {"token_fields": (("words", 4, 0),)},
        {"token_fields": (("words", 0, 2),)},
    ],
)
def test_config_rejects_bad_values(overrides):
    with pytest.raises(ValueError):
        make_config(**overrides)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown"):
        TwoTowerConfig.from_dict({**make_config().to_dict(), "surprise": 1})


def test_vectors_have_shape_and_unit_norm():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config())
    batch = make_batch(6, torch.Generator().manual_seed(1))
    users = model.user_vectors(batch["user_idx"])
    listings = model.listing_vectors(
        batch["listing_idx"], batch["codes"], batch["dense"], torch.ones(6, dtype=torch.bool)
    )
    assert users.shape == (6, 8)
    assert listings.shape == (6, 8)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(listings.norm(dim=1), torch.ones(6))


def test_unknown_id_embeds_from_features_alone():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config())
    codes = torch.tensor([[1, 2, 3], [1, 2, 3]])
    dense = torch.tensor([[0.5, -1.0], [0.5, -1.0]])
    ids = torch.tensor([4, 17])
    cold = model.listing_vectors(ids, codes, dense, torch.tensor([False, False]))
    torch.testing.assert_close(cold[0], cold[1])
    warm = model.listing_vectors(ids, codes, dense, torch.tensor([True, True]))
    assert not torch.allclose(warm[0], warm[1])
    mixed = model.listing_vectors(ids, codes, dense, torch.tensor([True, False]))
    torch.testing.assert_close(mixed[0], warm[0])
    torch.testing.assert_close(mixed[1], cold[1])


def test_listing_vectors_reject_wrong_feature_widths():
    model = TwoTowerModel(make_config())
    with pytest.raises(ValueError, match="codes"):
        model.listing_vectors(
            torch.tensor([0]), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2)
        )
    with pytest.raises(ValueError, match="dense"):
        model.listing_vectors(
            torch.tensor([0]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 5)
        )


def test_parameters_split_into_sparse_id_tables_and_dense_rest():
    model = TwoTowerModel(make_config())
    sparse, dense = model.sparse_parameters(), model.dense_parameters()
    assert [p.shape for p in sparse] == [(20, 8), (31, 8)]  # + the "unknown id" row
    assert len(sparse) + len(dense) == len(list(model.parameters()))
    assert not {id(p) for p in sparse} & {id(p) for p in dense}


def test_id_tables_get_sparse_gradients_and_unknown_row_none():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(id_dropout=0.5))
    model.train()
    model(make_batch(16, torch.Generator().manual_seed(2))).backward()
    for p in model.sparse_parameters():
        assert p.grad is not None and p.grad.is_sparse
    for p in model.dense_parameters():
        assert p.grad is not None and not p.grad.is_sparse
    touched = model.listing_embedding.weight.grad.coalesce().indices()[0]
    assert model.unknown_listing_idx not in touched.tolist()


def test_loss_masks_same_listing_collisions():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config())
    model.eval()
    batch = make_batch(4, torch.Generator().manual_seed(3))
    batch["listing_idx"] = torch.tensor([5, 5, 5, 5])
    batch["log_q"] = torch.zeros(4)
    # Every other column is the same listing: no negatives are left, so each row's softmax
    # has only its positive and the loss is exactly zero.
    assert model.loss(batch).item() == pytest.approx(0.0, abs=1e-6)
    batch["listing_idx"] = torch.tensor([5, 6, 7, 8])
    assert model.loss(batch).item() > 0


def test_loss_weights_examples_by_log1p_weight():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config())
    model.eval()
    batch = make_batch(8, torch.Generator().manual_seed(4))
    only_first = dict(batch, weight=torch.tensor([5.0] + [0.0] * 7))
    logits = (
        model.user_vectors(batch["user_idx"])
        @ model.listing_vectors(batch["listing_idx"], batch["codes"], batch["dense"]).T
        / model.config.temperature
        - batch["log_q"][None, :]
    )
    same = batch["listing_idx"][:, None] == batch["listing_idx"][None, :]
    same.fill_diagonal_(False)
    expected = torch.nn.functional.cross_entropy(
        logits.masked_fill(same, float("-inf"))[:1], torch.tensor([0])
    )
    torch.testing.assert_close(model.loss(only_first), expected)


def test_loss_is_finite_and_decreases_on_a_toy_problem():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(id_dropout=0.3))
    gen = torch.Generator().manual_seed(5)
    # Structure: user u likes listings whose make_code is u % 5.
    users = torch.arange(20).repeat(3)
    makes = users % 5
    batch = {
        "user_idx": users,
        "listing_idx": makes * 6 + torch.randint(0, 6, users.shape, generator=gen),
        "codes": torch.stack([makes, torch.zeros_like(makes), torch.zeros_like(makes)], 1),
        "dense": torch.zeros(len(users), 2),
        "weight": torch.ones(len(users)),
        "log_q": torch.full((len(users),), -3.0),
    }
    sparse_opt = torch.optim.SparseAdam(model.sparse_parameters(), lr=0.05)
    dense_opt = torch.optim.AdamW(model.dense_parameters(), lr=0.01)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(batch)
        assert torch.isfinite(loss)
        losses.append(loss.item())
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    assert losses[-1] < 0.7 * losses[0]


def test_out_of_range_codes_are_refused_not_read_from_another_feature():
    model = TwoTowerModel(make_config())
    codes = torch.tensor([[4, 3, 6], [5, 0, 0]])  # make_code has 5 codes: 5 is out of range
    with pytest.raises(ValueError, match="make_code"):
        model.listing_vectors(torch.tensor([0, 1]), codes, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="geo_cell"):
        model.listing_vectors(torch.tensor([0]), torch.tensor([[0, 0, -1]]), torch.zeros(1, 2))
    model.listing_vectors(torch.tensor([0]), torch.tensor([[4, 3, 6]]), torch.zeros(1, 2))


def test_feature_codes_share_one_table_without_collisions():
    model = TwoTowerModel(make_config())
    assert model.feature_embedding.weight.shape == (5 + 4 + 7, 4)
    assert model.code_offsets.tolist() == [0, 5, 9]
    # Same code value in different features reads different rows.
    rows = torch.tensor([[2, 2, 2]]) + model.code_offsets
    assert rows.tolist() == [[2, 7, 11]]
    assert "code_offsets" not in model.state_dict()


def test_loss_equals_full_softmax_with_repeated_listings_masked():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config())
    model.eval()
    batch = make_batch(24, torch.Generator().manual_seed(6))
    batch["listing_idx"] = batch["listing_idx"] % 7  # many repeats
    # A listing's features and log_q are the same wherever it appears.
    batch["codes"] = torch.stack([batch["listing_idx"] % c for _, c in CARDS], 1)
    batch["dense"] = batch["listing_idx"][:, None].float().repeat(1, 2) / 7
    batch["log_q"] = -(batch["listing_idx"].float() + 1) / 3
    users = model.user_vectors(batch["user_idx"])
    listings = model.listing_vectors(batch["listing_idx"], batch["codes"], batch["dense"])
    logits = users @ listings.T / model.config.temperature - batch["log_q"][None, :]
    same = batch["listing_idx"][:, None] == batch["listing_idx"][None, :]
    same.fill_diagonal_(False)
    per_row = torch.nn.functional.cross_entropy(
        logits.masked_fill(same, float("-inf")), torch.arange(24), reduction="none"
    )
    weights = torch.log1p(batch["weight"])
    expected = (weights * per_row).sum() / weights.sum()
    torch.testing.assert_close(model.loss(batch), expected)


def test_softmax_cross_entropy_survives_an_underflowing_target():
    from lib.model import weighted_softmax_cross_entropy

    users = torch.tensor([[1.0, 0.0]], requires_grad=True)
    listings = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    # Target column 1 sits 200 / T below column 0: its probability underflows to 0 in float32.
    loss = weighted_softmax_cross_entropy(
        users, listings, torch.zeros(2), torch.zeros(1), torch.tensor([1]), torch.ones(1), 100.0
    )
    assert loss.item() == pytest.approx(200.0)
    loss.backward()
    assert torch.isfinite(users.grad).all() and torch.isfinite(listings.grad).all()


def token_model() -> TwoTowerModel:
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(token_fields=TOKENS))
    model.eval()
    return model


def with_tokens(amenities: list[int], words: list[int]) -> torch.Tensor:
    """One listing's codes: the single codes, then the amenities' and the words' slots."""
    return torch.tensor([[1, 2, 3, *amenities, *words]])


def test_token_fields_share_one_table_after_the_single_codes():
    model = token_model()
    assert model.token_embedding.weight.shape == (6 + 4, 4)
    # Every slot of a field reads that field's rows of the shared table.
    assert model.slot_offsets.tolist() == [0, 0, 0, 6, 6]
    assert "slot_offsets" not in model.state_dict()
    # Each field adds one pooled vector to the tower's input.
    assert model.listing_mlp[0].in_features == 8 + (3 + 2) * 4 + 2
    with pytest.raises(ValueError, match="3 codes and 5 token slots"):
        model.listing_vectors(
            torch.tensor([0]), torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2)
        )


def test_a_listing_vector_follows_its_tokens_but_not_their_padding():
    model = token_model()
    dense = torch.zeros(1, 2)

    def vector(amenities, words):
        with torch.no_grad():
            return model.listing_vectors(torch.tensor([3]), with_tokens(amenities, words), dense)

    base = vector([2, 5, 0], [3, 0])
    # Another token, one token more or one fewer: another vector.
    for amenities, words in [([2, 4, 0], [3, 0]), ([2, 5, 1], [3, 0]), ([2, 5, 0], [3, 1])]:
        assert not torch.allclose(vector(amenities, words), base)
    assert not torch.allclose(vector([2, 0, 0], [3, 0]), base)
    # The same tokens in other slots, padding elsewhere: the same bag, the same vector.
    torch.testing.assert_close(vector([0, 5, 2], [0, 3]), base)
    torch.testing.assert_close(vector([5, 0, 2], [0, 3]), base)
    # The padding rows are never read: changing them changes nothing.
    with torch.no_grad():
        model.token_embedding.weight[[0, 6]] = 100.0
    torch.testing.assert_close(vector([2, 5, 0], [3, 0]), base)
    # A field with no tokens at all is a zero bag, not a NaN.
    assert torch.isfinite(vector([0, 0, 0], [0, 0])).all()


def test_token_codes_out_of_their_fields_range_are_refused():
    model = token_model()
    dense = torch.zeros(1, 2)
    model.listing_vectors(torch.tensor([0]), with_tokens([5, 5, 5], [3, 3]), dense)
    # 6 is past the amenities' 6 codes; 5 is an amenity code but past the words' 4: in the
    # shared table it would silently read another field's row.
    for amenities, words in [([6, 0, 0], [0, 0]), ([0, 0, 0], [5, 0]), ([0, -1, 0], [0, 0])]:
        with pytest.raises(ValueError, match="token codes out of range"):
            model.listing_vectors(torch.tensor([0]), with_tokens(amenities, words), dense)


def test_token_table_trains_except_its_padding_rows():
    model = token_model()
    model.train()
    gen = torch.Generator().manual_seed(7)
    batch = make_batch(16, gen)
    tokens = torch.cat(
        [torch.randint(0, 6, (16, 3), generator=gen), torch.randint(0, 4, (16, 2), generator=gen)],
        dim=1,
    )
    batch["codes"] = torch.cat([batch["codes"], tokens], dim=1)
    model(batch).backward()
    grad = model.token_embedding.weight.grad
    assert grad is not None and not grad.is_sparse
    assert grad[[0, 6]].eq(0).all()
    assert grad[[1, 2, 3, 4, 5, 7, 8, 9]].abs().sum() > 0


def test_a_catalogue_without_features_trains_and_embeds_cold_listings_alike():
    torch.manual_seed(0)
    model = TwoTowerModel(make_config(cardinalities=(), num_dense=0, id_dropout=0.3))
    assert model.feature_embedding is None and model.token_embedding is None
    gen = torch.Generator().manual_seed(8)
    batch = make_batch(16, gen)
    batch["codes"] = torch.zeros(16, 0, dtype=torch.long)
    batch["dense"] = torch.zeros(16, 0)
    sparse_opt = torch.optim.SparseAdam(model.sparse_parameters(), lr=0.05)
    dense_opt = torch.optim.AdamW(model.dense_parameters(), lr=0.01)
    model.train()
    loss = model(batch)
    assert torch.isfinite(loss)
    loss.backward()
    # Every parameter takes part (DDP refuses parameters that get no gradient).
    assert all(p.grad is not None for p in model.parameters())
    sparse_opt.step()
    dense_opt.step()

    model.eval()
    ids = torch.arange(30)
    none = torch.zeros(30, 0, dtype=torch.long)
    with torch.no_grad():
        cold = model.listing_vectors(ids, none, torch.zeros(30, 0), torch.zeros(30, dtype=bool))
        warm = model.listing_vectors(ids, none, torch.zeros(30, 0), torch.ones(30, dtype=bool))
    # Nothing tells cold listings apart: they all get one vector; known ids do not.
    torch.testing.assert_close(cold, cold[:1].expand(30, -1))
    torch.testing.assert_close(cold.norm(dim=1), torch.ones(30))
    assert not torch.allclose(warm[0], warm[1])
