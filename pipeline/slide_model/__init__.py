"""slide_model"""
